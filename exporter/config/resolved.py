"""The configuration the exporter runs with: immutable, every default and layer applied."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import SecretStr

from exporter.kv.facts import KvOverrides
from exporter.llama.limits import RequestLimits
from exporter.probe.plan import MeasurePlan
from exporter.schedule.plan import Schedule


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    api_key: SecretStr | None = field(default=None, repr=False)
    plan: MeasurePlan = field(default_factory=MeasurePlan)
    schedule: Schedule = field(default_factory=Schedule)
    limits: RequestLimits = field(default_factory=RequestLimits)
    proxy: str | None = None  # for this target's traffic only; the environment's is ignored
    pid_file: Path | None = None
    process_name: str | None = None
    kv: KvOverrides = field(default_factory=KvOverrides)


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...]
    listen_address: str
    telemetry_path: str
    log_format: str
    log_level: str
    gpu: bool = True
    web_config_file: Path | None = None
