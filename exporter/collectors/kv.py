"""Each target's KV cache: what one token costs, how many fit, how many are held."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import Metric as Family

from exporter.collectors import catalogue as m
from exporter.kv.facts import KV_REASONS
from exporter.state.store import TargetState


class KvCollector:
    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        per_token, cap_tokens, cap_bytes, used, errors = (
            m.KV_BYTES_PER_TOKEN.family(), m.KV_CAPACITY_TOKENS.family(),
            m.KV_CAPACITY_BYTES.family(), m.KV_USED_TOKENS.family(), m.KV_ERRORS.family(),
        )  # fmt: skip
        for t in targets:
            for reason in KV_REASONS:
                errors.add_metric([t.name, reason], t.kv_errors[reason])
            for view in t.views():
                facts, server = view.model_facts, view.server
                if facts is None or server is None or not view.up:
                    continue
                labels = [t.name, server.model, str(server.ctx), facts.type_k, facts.type_v]
                per_token.add_metric(labels, facts.bytes_per_token)
                if facts.capacity is not None:
                    cap_tokens.add_metric(labels, facts.capacity.cells)
                    cap_bytes.add_metric(labels, facts.capacity.total_bytes)
                if view.tokens_held is not None:
                    used.add_metric(labels, view.tokens_held)
        yield from (per_token, cap_tokens, cap_bytes, used, errors)
