"""What each target serves, from its /props and /v1/models."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.core import Metric as Family

from exporter.collectors import catalogue as m
from exporter.state.store import TargetState


class ServerCollector:
    def collect(self, targets: Sequence[TargetState]) -> Iterable[Family]:
        up, info = m.SERVER_UP.family(), m.SERVER_INFO.family()
        params, size, train = (
            m.MODEL_PARAMETERS.family(), m.MODEL_SIZE.family(), m.MODEL_TRAIN_CTX.family(),
        )  # fmt: skip
        for t in targets:
            up.add_metric([t.name], 1.0 if t.up else 0.0)
            s = t.server
            if not t.up or s is None:
                continue  # what a down server serves is unknown: its info series disappear
            info.add_metric([t.name, s.model, str(s.ctx), s.quant, s.build, str(s.slots)], 1.0)
            for fam, value in ((params, s.n_params), (size, s.size_bytes), (train, s.n_ctx_train)):
                if value is not None:
                    fam.add_metric([t.name, s.model], value)
        yield from (up, info, params, size, train)
