"""How much the exporter accepts from a server: each bound declared once, with its meaning.

Everything a probed server sends is untrusted. These bounds keep a broken or hostile one from
holding discovery for ever or from growing the exporter's memory; they are settings because a
deep probe on a server that echoes its prompt back needs more room than the default gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.declared import Declared, setting

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestLimits(Declared):
    """Bounds on each request the exporter makes to a server."""

    # Discovery decides llama_speed_server_up: it must answer within seconds, whatever the
    # round's own timeout, and a server that drips its answer must not hold it for ever.
    discovery_timeout: float = setting(
        10.0,
        "seconds each /props, /v1/models, /slots or /metrics read may take in all",
        gt=0,
        le=300,
    )
    # b11434's answers are a few KiB (/props with its chat template: up to some 100 KiB). The
    # final event of a completion is asked to leave the prompt out (`response_fields`); a
    # server that ignores that echoes it, about 8 bytes a token: 2 MiB at depth 262,144.
    max_response_bytes: int = setting(
        8 * MIB,
        "largest response body or stream line accepted from a server, in bytes",
        ge=64 * 1024,
        le=1024 * MIB,
    )
