"""What each target serves, from its /props and /v1/models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import Metric as Family

from exporter.collectors import catalogue as m
from exporter.state.store import TargetState


class ServerCollector:
    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        up, info, loaded = m.SERVER_UP.family(), m.SERVER_INFO.family(), m.MODEL_LOADED.family()
        params, size, train = (
            m.MODEL_PARAMETERS.family(), m.MODEL_SIZE.family(), m.MODEL_TRAIN_CTX.family(),
        )  # fmt: skip
        for t in targets:
            up.add_metric([t.name], 1.0 if t.up else 0.0)
            if not t.up:
                continue  # what a down server serves is unknown: its info series disappear
            if t.multi:
                for name, is_loaded in sorted(t.listed.items()):
                    loaded.add_metric([t.name, name], 1.0 if is_loaded else 0.0)
            elif t.server is not None:
                # A single server's model is loaded while it is up: one model variable and
                # one "loaded" panel serve every kind of target.
                loaded.add_metric([t.name, t.server.model], 1.0)
            for view in t.views():
                s = view.server
                if not view.up or s is None:
                    continue
                info.add_metric([t.name, s.model, str(s.ctx), s.quant, s.build, str(s.slots)], 1.0)
                for fam, value in (
                    (params, s.n_params), (size, s.size_bytes), (train, s.n_ctx_train),
                ):  # fmt: skip
                    if value is not None:
                        fam.add_metric([t.name, s.model], value)
        yield from (up, info, loaded, params, size, train)
