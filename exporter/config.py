"""Settings: command-line flags over `LLAMA_SPEED_*` environment variables over a config file.

pydantic-settings does the layering (see `Settings.settings_customise_sources`); `load_config`
then resolves the layered settings into immutable `Config`/`Target` objects that the rest of
the exporter uses, and turns every problem into one `ConfigError` naming the key.
"""

from __future__ import annotations

import contextvars
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

ENV_PREFIX = "LLAMA_SPEED_"
DEFAULT_TARGET_URL = "http://127.0.0.1:8080"
# 18088 lies outside the 9100-10xxx block of Prometheus' default port allocations.
DEFAULT_LISTEN_ADDRESS = ":18088"


class ConfigError(Exception):
    """A configuration problem, reported as one line naming the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}" if key else problem)
        self.key = key
        self.problem = problem


def _split_list(value: Any) -> Any:
    """Lists from the environment or a flag may be written `a,b,c` as well as JSON."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return yaml.safe_load(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ProbePlanFields(_Strict):
    """Every field of a probe plan, all optional: the global plan and each target's overrides."""

    interval: float | None = Field(None, gt=0, description="seconds between probe rounds")
    timeout: float | None = Field(None, gt=0, description="seconds one probe round may take")
    jitter: float | None = Field(None, ge=0, description="random delay added to each round, s")
    discovery_interval: float | None = Field(None, gt=0, description="seconds between /props reads")
    prompt_tokens: int | None = Field(None, ge=1, description="fresh prompt tokens per PP sample")
    generation_tokens: int | None = Field(None, ge=2, description="tokens generated per TG sample")
    depths: Annotated[list[int] | None, NoDecode] = Field(None, description="context depths")
    repetitions: int | None = Field(None, ge=1, description="samples per depth and round")
    slot: int | None = Field(None, ge=0, description="slot id; default the highest-numbered")
    duty_budget: float | None = Field(None, gt=0, le=1, description="max share of wall time")
    warmup: bool | None = Field(
        None, description="send one unmeasured request before each round, as llama-bench does"
    )
    require_busy_check: bool | None = Field(
        None, description="skip probes when busyness cannot be read (no /slots, no /metrics)"
    )

    _split_depths = field_validator("depths", mode="before")(_split_list)

    @field_validator("depths")
    @classmethod
    def _depths_valid(cls, value: list[int] | None) -> list[int] | None:
        if value is None:
            return None
        if not value:
            raise ValueError("must list at least one depth")
        if any(d < 0 for d in value):
            raise ValueError("depths must be 0 or more tokens")
        return sorted(set(value))


PLAN_DEFAULTS: dict[str, Any] = {
    # A round of the defaults on a 22 t/s server (warm-up, 3 x pp512 + tg128) takes about 20 s:
    # every 20 minutes that is 1.7% of wall time, inside the 2% duty budget.
    "interval": 1200.0,
    "timeout": 120.0,
    "jitter": 10.0,
    "discovery_interval": 30.0,
    "prompt_tokens": 512,
    "generation_tokens": 128,
    "depths": [0],
    "repetitions": 3,
    "slot": None,
    "duty_budget": 0.02,
    "warmup": True,
    "require_busy_check": True,
}


class TargetFields(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    # How to find the server's process on this host, for its share of GPU memory. Without
    # either, a target on a loopback address or this host's name is found by its port.
    pid_file: Path | None = None
    process_name: str | None = None
    # What the KV cache arithmetic needs when the server's process is not visible here, or
    # its /props model_path is not this host's path (a container's view).
    model_path: Path | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    kv_unified: bool | None = None
    probe: ProbePlanFields = ProbePlanFields()


class CollectorFields(_Strict):
    gpu: bool = True


class WebFields(_Strict):
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    telemetry_path: str = "/metrics"
    # exporter-toolkit's web config (TLS, basic auth): read and watched by exporter.webconfig.
    config_file: Path | None = None


class LogFields(_Strict):
    format: Literal["json", "console"] = "console"
    level: Literal["debug", "info", "warning", "error"] = "info"


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "config_file", default=None
)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or YAML file into a mapping; problems become a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text) if path.suffix == ".toml" else yaml.safe_load(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError("config", f"{path} is not valid YAML{line}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of settings at the top level")
    return data


class _ConfigFileSource(PydanticBaseSettingsSource):
    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ returns the whole mapping

    def __call__(self) -> dict[str, Any]:
        path = _config_file.get()
        return read_config_file(path) if path is not None else {}


class Settings(BaseSettings):
    """The layered settings, as a user writes them."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        frozen=True,
    )

    target: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_key: SecretStr | None = None
    api_key_file: Path | None = None
    targets: list[TargetFields] = Field(default_factory=list)
    probe: ProbePlanFields = ProbePlanFields()
    web: WebFields = WebFields()
    log: LogFields = LogFields()
    collector: CollectorFields = CollectorFields()

    _split_target = field_validator("target", mode="before")(_split_list)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Flags arrive as init kwargs, so they win over the environment and the file.
        return init_settings, env_settings, _ConfigFileSource(settings_cls)


@dataclass(frozen=True)
class ProbePlan:
    interval: float
    timeout: float
    jitter: float
    discovery_interval: float
    prompt_tokens: int
    generation_tokens: int
    depths: tuple[int, ...]
    repetitions: int
    slot: int | None
    duty_budget: float
    warmup: bool
    require_busy_check: bool


@dataclass(frozen=True)
class KvOverrides:
    """What the config file says about a target's KV cache; it beats the process's options."""

    model_path: Path | None = None
    cache_type_k: str | None = None
    cache_type_v: str | None = None
    kv_unified: bool | None = None


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    api_key: SecretStr | None = field(default=None, repr=False)
    plan: ProbePlan = field(default_factory=lambda: resolve_plan([]))
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


def resolve_plan(layers: list[ProbePlanFields], key: str = "probe") -> ProbePlan:
    values = dict(PLAN_DEFAULTS)
    for layer in layers:
        values.update(layer.model_dump(exclude_none=True, exclude_unset=True))
    plan = ProbePlan(**{**values, "depths": tuple(values["depths"])})
    # Jitter delays a round by up to `jitter` s past its slot, so the next round may come
    # interval - jitter after it: a round must end by then, or two would run at once.
    if plan.interval <= plan.timeout + plan.jitter:
        raise ConfigError(
            f"{key}.interval",
            f"{plan.interval:g} s must be longer than the probe timeout plus jitter "
            f"({plan.timeout:g} s + {plan.jitter:g} s)",
        )
    if plan.discovery_interval > plan.interval:
        raise ConfigError(
            f"{key}.discovery_interval",
            f"{plan.discovery_interval:g} s must not exceed the probe interval "
            f"({plan.interval:g} s)",
        )
    return plan


def _check_url(url: str, key: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{url!r} is not an http:// or https:// URL with a host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"{url!r} has an invalid port") from exc
    return url.rstrip("/")


def default_target_name(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _read_key_file(path: Path, key: str) -> SecretStr:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc
    # Same file format as llama-server's --api-key-file: one key a line, '#' starts a comment.
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(key, f"{path} holds no API key")
    return SecretStr(keys[0])


def _resolve_key(t: TargetFields, settings: Settings, key: str) -> SecretStr | None:
    given = [n for n in ("api_key", "api_key_env", "api_key_file") if getattr(t, n) is not None]
    if len(given) > 1:
        raise ConfigError(key, f"set only one of {', '.join(given)}")
    if t.api_key is not None:
        return t.api_key
    if t.api_key_env is not None:
        value = os.environ.get(t.api_key_env)
        if not value:
            raise ConfigError(
                f"{key}.api_key_env", f"environment variable {t.api_key_env} is unset"
            )
        return SecretStr(value)
    if t.api_key_file is not None:
        return _read_key_file(t.api_key_file, f"{key}.api_key_file")
    return _global_key(settings)


def _global_key(settings: Settings) -> SecretStr | None:
    if settings.api_key is not None and settings.api_key_file is not None:
        raise ConfigError("api_key", "set only one of api_key, api_key_file")
    if settings.api_key_file is not None:
        return _read_key_file(settings.api_key_file, "api_key_file")
    return settings.api_key


def resolve(settings: Settings) -> Config:
    """Turn layered settings into the exporter's immutable configuration."""
    if settings.target:
        # Flags and LLAMA_SPEED_TARGET replace the file's target list: the narrower layer wins.
        fields = [TargetFields(url=url) for url in settings.target]
        keys = [f"target.{i}" for i in range(len(fields))]
    elif settings.targets:
        fields = list(settings.targets)
        keys = [f"targets.{i}" for i in range(len(fields))]
    else:
        fields, keys = [TargetFields(url=DEFAULT_TARGET_URL)], ["target.0"]

    resolve_plan([settings.probe])  # a fault in the shared plan is named there, not per target
    targets: list[Target] = []
    for t, key in zip(fields, keys, strict=True):
        url = _check_url(t.url, f"{key}.url" if key.startswith("targets") else key)
        plan = resolve_plan([settings.probe, t.probe], f"{key}.probe")
        targets.append(
            Target(
                name=t.name or default_target_name(url),
                url=url,
                api_key=_resolve_key(t, settings, key),
                plan=plan,
                pid_file=t.pid_file,
                process_name=t.process_name,
                kv=KvOverrides(t.model_path, t.cache_type_k, t.cache_type_v, t.kv_unified),
            )
        )
    names = [t.name for t in targets]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{keys[i]}.name", f"duplicate target name {name!r}")

    _check_listen_address(settings.web.listen_address)
    if not settings.web.telemetry_path.startswith("/") or settings.web.telemetry_path == "/":
        raise ConfigError("web.telemetry_path", "must be a path like /metrics")
    return Config(
        targets=tuple(targets),
        listen_address=settings.web.listen_address,
        telemetry_path=settings.web.telemetry_path,
        log_format=settings.log.format,
        log_level=settings.log.level,
        gpu=settings.collector.gpu,
        web_config_file=settings.web.config_file,
    )


def split_listen_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)  # noqa: S104 - exporters listen on all


def _check_listen_address(address: str) -> None:
    try:
        split_listen_address(address)
    except ValueError as exc:
        raise ConfigError("web.listen_address", str(exc)) from exc


def _describe(error: Any) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    if kind == "extra_forbidden":
        return f"{loc}: unknown key"
    if kind == "missing":
        return f"{loc}: required key is missing"
    message = str(error["msg"]).removeprefix("Value error, ")
    return f"{loc}: {message}" if loc else message


def load_config(overrides: dict[str, Any], config_file: Path | None) -> Config:
    """Layer `overrides` (from flags) over the environment over `config_file`, then resolve."""
    token = _config_file.set(config_file)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        errors = exc.errors()
        first = _describe(errors[0])
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        key, _, problem = first.partition(": ")
        raise ConfigError(key, problem + more) from None
    except ValueError as exc:  # pydantic-settings' own parse errors (e.g. bad JSON in env)
        raise ConfigError("environment", str(exc).splitlines()[0]) from None
    finally:
        _config_file.reset(token)
    return resolve(settings)
