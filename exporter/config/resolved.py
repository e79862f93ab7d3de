"""The configuration the exporter runs with: immutable, every default and layer applied."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any, Literal

from exporter.kv.facts import KvOverrides
from exporter.llama.limits import RequestLimits
from exporter.llama.secret import Secret
from exporter.probe.plan import MeasurePlan
from exporter.schedule.plan import Schedule

TargetMode = Literal["auto", "single", "router", "llama-swap"]


@dataclass(frozen=True)
class ModelPlan:
    """A target's plan for the models whose name matches `glob`; None: not probed."""

    glob: str
    plan: MeasurePlan | None


@dataclass(frozen=True)
class ModelRules:
    """Which models behind a router or llama-swap are watched, and each one's plan.

    Globs match the whole name, case-sensitively (`fnmatchcase`): model names are labels,
    and `Qwen*` must not pick `qwen-draft`."""

    include: tuple[str, ...] = ()  # none: every model
    exclude: tuple[str, ...] = ()
    plans: tuple[ModelPlan, ...] = ()  # the first whose glob matches, in the order written

    def watched(self, model: str) -> bool:
        included = not self.include or any(fnmatchcase(model, g) for g in self.include)
        return included and not any(fnmatchcase(model, g) for g in self.exclude)

    def plan_for(self, model: str, default: MeasurePlan) -> MeasurePlan | None:
        for rule in self.plans:
            if fnmatchcase(model, rule.glob):
                return rule.plan
        return default


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    api_key: Secret | None = field(default=None, repr=False)
    plan: MeasurePlan = field(default_factory=MeasurePlan)
    schedule: Schedule = field(default_factory=Schedule)
    limits: RequestLimits = field(default_factory=RequestLimits)
    proxy: str | None = None  # for this target's traffic only; the environment's is ignored
    pid_file: Path | None = None
    process_name: str | None = None
    kv: KvOverrides = field(default_factory=KvOverrides)
    # What serves at the URL: found from the server itself (auto), or as configured.
    mode: TargetMode = "auto"
    models: ModelRules = field(default_factory=ModelRules)


@dataclass(frozen=True)
class Config:
    targets: tuple[Target, ...]
    listen_address: str
    telemetry_path: str
    log_format: str
    log_level: str
    gpu: bool = True
    web_config_file: Path | None = None
    storage_path: Path | None = None  # the bands' state file's directory


def config_to_json(config: Config) -> str:
    """The whole configuration, the API keys included, for `config_from_json` in the daemon's
    own process (`exporter.serve`); never written anywhere but the hand-over."""
    return json.dumps(
        {
            "targets": [_target_to_json(t) for t in config.targets],
            "listen_address": config.listen_address,
            "telemetry_path": config.telemetry_path,
            "log_format": config.log_format,
            "log_level": config.log_level,
            "gpu": config.gpu,
            "web_config_file": _path_text(config.web_config_file),
            "storage_path": _path_text(config.storage_path),
        }
    )


def config_from_json(text: str | bytes) -> Config:
    data = json.loads(text)
    return Config(
        targets=tuple(_target_from_json(t) for t in data["targets"]),
        listen_address=data["listen_address"],
        telemetry_path=data["telemetry_path"],
        log_format=data["log_format"],
        log_level=data["log_level"],
        gpu=data["gpu"],
        web_config_file=_path(data["web_config_file"]),
        storage_path=_path(data["storage_path"]),
    )


def _target_to_json(t: Target) -> dict[str, Any]:
    return {
        "name": t.name,
        "url": t.url,
        "api_key": None if t.api_key is None else t.api_key.get_secret_value(),
        "plan": t.plan.as_json(),
        "schedule": t.schedule.as_json(),
        "limits": t.limits.as_json(),
        "proxy": t.proxy,
        "pid_file": _path_text(t.pid_file),
        "process_name": t.process_name,
        "kv": {
            "model_path": _path_text(t.kv.model_path),
            "cache_type_k": t.kv.cache_type_k,
            "cache_type_v": t.kv.cache_type_v,
            "kv_unified": t.kv.kv_unified,
        },
        "mode": t.mode,
        "models": {
            "include": list(t.models.include),
            "exclude": list(t.models.exclude),
            "plans": [
                {"glob": p.glob, "plan": None if p.plan is None else p.plan.as_json()}
                for p in t.models.plans
            ],
        },
    }


def _target_from_json(data: dict[str, Any]) -> Target:
    kv = data["kv"]
    return Target(
        name=data["name"],
        url=data["url"],
        api_key=None if data["api_key"] is None else Secret(data["api_key"]),
        plan=MeasurePlan(**data["plan"]),
        schedule=Schedule(**data["schedule"]),
        limits=RequestLimits(**data["limits"]),
        proxy=data["proxy"],
        pid_file=_path(data["pid_file"]),
        process_name=data["process_name"],
        kv=KvOverrides(
            _path(kv["model_path"]), kv["cache_type_k"], kv["cache_type_v"], kv["kv_unified"]
        ),
        mode=data["mode"],
        models=ModelRules(
            include=tuple(data["models"]["include"]),
            exclude=tuple(data["models"]["exclude"]),
            plans=tuple(
                ModelPlan(p["glob"], None if p["plan"] is None else MeasurePlan(**p["plan"]))
                for p in data["models"]["plans"]
            ),
        ),
    )


def _path_text(path: Path | None) -> str | None:
    return None if path is None else str(path)


def _path(text: str | None) -> Path | None:
    return None if text is None else Path(text)
