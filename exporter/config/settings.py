"""Settings: command-line flags over `LLAMA_SPEED_*` environment variables over a config file.

pydantic-settings does the layering (see `Settings.settings_customise_sources`); `load_config`
then resolves the layered settings into the immutable `Config` and `Target` the rest of the
exporter uses, and turns every problem into one `ConfigError` naming the key.

The probe settings are declared once, in `MeasurePlan` (what a round measures) and `Schedule`
(when rounds run); the `probe` section of the file, its flags and variables are derived from
them, every field optional so that a target's section overrides only what it names.
"""

from __future__ import annotations

import contextvars
import dataclasses
import os
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, cast, get_origin, get_type_hints
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    create_model,
)
from pydantic.fields import FieldInfo
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from exporter.config.errors import ConfigError
from exporter.config.resolved import Config, ModelPlan, ModelRules, Target
from exporter.declared import Declared, SettingError, spec_of
from exporter.host.address import port_of, split_listen_address
from exporter.kv.facts import KvOverrides
from exporter.llama.limits import RequestLimits
from exporter.llama.secret import Secret
from exporter.probe.plan import MeasurePlan
from exporter.schedule.plan import Schedule

ENV_PREFIX = "LLAMA_SPEED_"
DEFAULT_TARGET_URL = "http://127.0.0.1:8080"
# 18088 lies outside the 9100-10xxx block of Prometheus' default port allocations.
DEFAULT_LISTEN_ADDRESS = ":18088"
# The declarations whose fields make up a `probe` section, in the order flags list them.
PROBE_SECTIONS: tuple[type[Declared], ...] = (Schedule, MeasurePlan, RequestLimits)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def split_list(value: Any) -> Any:
    """A list from a flag or the environment may be written `a,b,c` as well as JSON."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("[") and text.endswith("]"):
            text = text[1:-1]
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


def _optional(hint: Any, field: dataclasses.Field[Any]) -> tuple[Any, FieldInfo]:
    """A declared setting as the settings layer reads it: parsed into its type, None by
    default ('not set here'). Its bounds are the value's own, checked when it is built
    (`exporter.declared`)."""
    annotation: Any = hint | None
    if get_origin(hint) in (tuple, list):
        # A list from a flag or the environment is written `0,4096`, not JSON: pydantic-settings
        # must leave it to split_list, and looks for NoDecode on the field.
        annotation = Annotated[annotation, NoDecode, BeforeValidator(split_list)]
    # Field() is typed as returning its default, for class bodies; here it is the FieldInfo.
    optional = cast(FieldInfo, Field(None, description=spec_of(field).description))
    return annotation, optional


def _declared_fields(*sections: type[Declared]) -> dict[str, tuple[Any, FieldInfo]]:
    fields: dict[str, tuple[Any, FieldInfo]] = {}
    for section in sections:
        hints = get_type_hints(section)
        for field in dataclasses.fields(section):
            fields[field.name] = _optional(hints[field.name], field)
    return fields


def _probe_fields_model() -> type[BaseModel]:
    return create_model(  # type: ignore[call-overload,no-any-return]
        "ProbeFields",
        __config__=ConfigDict(extra="forbid", frozen=True),
        **_declared_fields(*PROBE_SECTIONS),
    )


def _model_probe_fields_model() -> type[BaseModel]:
    """A `model_probe` entry: what a round measures (`MeasurePlan`, every field optional),
    and whether the model is probed at all. When rounds run stays the target's: its models
    share the GPUs and take turns within one schedule and duty budget."""
    fields: dict[str, Any] = _declared_fields(MeasurePlan)
    fields["enabled"] = (bool, Field(True, description="probe the models this glob matches"))
    return create_model(
        "ModelProbeFields", __config__=ConfigDict(extra="forbid", frozen=True), **fields
    )


if TYPE_CHECKING:
    ProbeFields = BaseModel
    ModelProbeFields = BaseModel
else:
    ProbeFields = _probe_fields_model()
    ModelProbeFields = _model_probe_fields_model()


class ModelSelection(_Strict):
    """Which models of a router or llama-swap the exporter watches, by glob on their names."""

    include: list[str] = Field(default_factory=list)  # none: every model
    exclude: list[str] = Field(default_factory=list)


class TargetFields(_Strict):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_.:-]+$")
    url: str
    api_key: SecretStr | None = None
    api_key_env: str | None = None
    api_key_file: Path | None = None
    # Target traffic ignores HTTP_PROXY and the like (they would receive the API key): a
    # proxy is used only where a target names one.
    proxy: str | None = None
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
    probe: ProbeFields = Field(default_factory=ProbeFields)
    # Several models behind one endpoint (docs/multi-model.md): what serves at the URL, which
    # of its models are watched, and a plan per model glob over the target's `probe`.
    mode: Literal["auto", "single", "router", "llama-swap"] = "auto"
    models: ModelSelection = Field(default_factory=ModelSelection)
    model_probe: dict[str, ModelProbeFields] = Field(default_factory=dict)


class CollectorFields(_Strict):
    gpu: bool = Field(True, description="read GPUs through NVML: true or false")


class WebFields(_Strict):
    listen_address: str = Field(DEFAULT_LISTEN_ADDRESS, description="address to serve metrics on")
    telemetry_path: str = Field("/metrics", description="path of the metrics endpoint")
    # exporter-toolkit's web config (TLS, basic auth): read and watched by exporter.web.
    config_file: Path | None = Field(
        None,
        description="web config file: TLS and basic auth (default: plain HTTP, no auth)",
        json_schema_extra={"flag": "--web.config.file", "metavar": "PATH"},
    )


class StorageFields(_Strict):
    # Optional: without it the bands rebuild from the first rounds after each start, and the
    # regression alerts stay unarmed until they have (docs/alerting.md).
    path: Path | None = Field(
        None,
        description="directory for the state file that keeps each series' band over restarts",
        json_schema_extra={"metavar": "DIR"},
    )


class LogFields(_Strict):
    format: Literal["json", "console"] = Field("console", description="json or console")
    level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="debug, info, warning or error"
    )


_config_file: contextvars.ContextVar[Path | None] = contextvars.ContextVar(
    "config_file", default=None
)


def read_config_file(path: Path) -> dict[str, Any]:
    """Parse a TOML or YAML file into a mapping; problems become a ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("config", f"cannot read {path}: {exc.strerror or exc}") from exc
    if path.suffix == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from exc
    else:
        data = _yaml_mapping(path, text)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("config", f"{path} must hold a mapping of settings at the top level")
    return data


def _yaml_mapping(path: Path, text: str) -> Any:
    # Imported here: about 1 MiB that a daemon configured by flags alone never needs.
    import yaml  # noqa: PLC0415

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError("config", f"{path} is not valid YAML{line}") from exc


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

    target: Annotated[list[str], NoDecode, BeforeValidator(split_list)] = Field(
        default_factory=list,
        description="llama-server URL to probe; replaces the file's targets",
        json_schema_extra={"repeatable": True, "metavar": "URL", "shown": DEFAULT_TARGET_URL},
    )
    api_key: SecretStr | None = Field(None, json_schema_extra={"flag": None})
    api_key_file: Path | None = Field(
        None,
        description="file holding the API key for --target servers",
        json_schema_extra={"metavar": "PATH"},
    )
    targets: list[TargetFields] = Field(default_factory=list, json_schema_extra={"flag": None})
    web: WebFields = WebFields()
    probe: ProbeFields = Field(default_factory=ProbeFields)
    collector: CollectorFields = CollectorFields()
    log: LogFields = LogFields()
    storage: StorageFields = StorageFields()

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


def _error_key(prefix: str, error: Any) -> str:
    return ".".join([prefix, *(str(part) for part in error["loc"])])


def resolve_probe(
    layers: Sequence[BaseModel], key: str = "probe"
) -> tuple[MeasurePlan, Schedule, RequestLimits]:
    """The plan, schedule and request limits of `layers` (the global section, then a
    target's) over the defaults."""
    values: dict[str, Any] = {}
    for layer in layers:
        values.update(layer.model_dump(exclude_none=True))
    try:
        schedule = Schedule.pick(values)
        plan = MeasurePlan.pick(values)
        limits = RequestLimits.pick(values)
    except SettingError as exc:
        raise ConfigError(f"{key}.{exc.loc}" if exc.loc else key, exc.problem) from None
    # Jitter delays a round by up to `jitter` s past its slot, so the next round may come
    # interval - jitter after it: a round must end by then, or two would run at once.
    if schedule.interval <= plan.timeout + schedule.jitter:
        raise ConfigError(
            f"{key}.interval",
            f"{schedule.interval:g} s must be longer than the probe timeout plus jitter "
            f"({plan.timeout:g} s + {schedule.jitter:g} s)",
        )
    if schedule.discovery_interval > schedule.interval:
        raise ConfigError(
            f"{key}.discovery_interval",
            f"{schedule.discovery_interval:g} s must not exceed the probe interval "
            f"({schedule.interval:g} s)",
        )
    return plan, schedule, limits


def _check_url(url: str, key: str) -> str:
    if not url.isascii() or not url.isprintable():
        raise ConfigError(key, "must be a URL of printable ASCII characters (percent-encode)")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(key, f"{url!r} is not an http:// or https:// URL with a host")
    try:
        _ = parts.port
    except ValueError as exc:
        raise ConfigError(key, f"{url!r} has an invalid port") from exc
    return url.rstrip("/")


def default_target_name(url: str) -> str:
    return f"{urlsplit(url).hostname}:{port_of(url)}"


def _read_key_file(path: Path, key: str) -> Secret:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from exc
    # Same file format as llama-server's --api-key-file: one key a line, '#' starts a comment.
    keys = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(key, f"{path} holds no API key")
    return _checked_key(keys[0], key)


def _checked_key(value: str, key: str) -> Secret:
    """An API key travels in an HTTP header: printable ASCII only. Said here, once, rather
    than as an encoding error at the first request; the message never shows the key."""
    if not value.isascii() or not value.isprintable() or value != value.strip():
        raise ConfigError(key, "the API key must be printable ASCII without spaces at its ends")
    return Secret(value)


def _resolve_key(t: TargetFields, settings: Settings, key: str) -> Secret | None:
    given = [n for n in ("api_key", "api_key_env", "api_key_file") if getattr(t, n) is not None]
    if len(given) > 1:
        raise ConfigError(key, f"set only one of {', '.join(given)}")
    if t.api_key is not None:
        return _checked_key(t.api_key.get_secret_value(), f"{key}.api_key")
    if t.api_key_env is not None:
        value = os.environ.get(t.api_key_env)
        if not value:
            raise ConfigError(
                f"{key}.api_key_env", f"environment variable {t.api_key_env} is unset"
            )
        return _checked_key(value, f"{key}.api_key_env")
    if t.api_key_file is not None:
        return _read_key_file(t.api_key_file, f"{key}.api_key_file")
    return _global_key(settings)


def _global_key(settings: Settings) -> Secret | None:
    if settings.api_key is not None and settings.api_key_file is not None:
        raise ConfigError("api_key", "set only one of api_key, api_key_file")
    if settings.api_key_file is not None:
        return _read_key_file(settings.api_key_file, "api_key_file")
    if settings.api_key is None:
        return None
    return _checked_key(settings.api_key.get_secret_value(), "api_key")


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

    resolve_probe([settings.probe])  # a fault in the shared plan is named there, not per target
    targets: list[Target] = []
    for t, key in zip(fields, keys, strict=True):
        url = _check_url(t.url, f"{key}.url" if key.startswith("targets") else key)
        plan, schedule, limits = resolve_probe([settings.probe, t.probe], f"{key}.probe")
        targets.append(
            Target(
                name=t.name or default_target_name(url),
                url=url,
                api_key=_resolve_key(t, settings, key),
                plan=plan,
                schedule=schedule,
                limits=limits,
                proxy=None if t.proxy is None else _check_url(t.proxy, f"{key}.proxy"),
                pid_file=t.pid_file,
                process_name=t.process_name,
                kv=KvOverrides(t.model_path, t.cache_type_k, t.cache_type_v, t.kv_unified),
                mode=t.mode,
                models=_model_rules(t, [settings.probe, t.probe], key),
            )
        )
    names = [t.name for t in targets]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ConfigError(f"{keys[i]}.name", f"duplicate target name {name!r}")

    _check_listen_address(settings.web.listen_address)
    _check_telemetry_path(settings.web.telemetry_path)
    return Config(
        targets=tuple(targets),
        listen_address=settings.web.listen_address,
        telemetry_path=settings.web.telemetry_path,
        log_format=settings.log.format,
        log_level=settings.log.level,
        gpu=settings.collector.gpu,
        web_config_file=settings.web.config_file,
        storage_path=_check_storage_path(settings.storage.path),
    )


def _check_storage_path(path: Path | None) -> Path | None:
    """The state directory must exist: a typo should stop the start, not lose every band."""
    if path is not None and not path.is_dir():
        raise ConfigError("storage.path", f"{path} is not a directory")
    return path


def _model_rules(t: TargetFields, layers: list[BaseModel], key: str) -> ModelRules:
    """Each `model_probe` glob's plan, over the target's: checked here, whole, like the
    target's own, so that a bad override stops the start rather than a round."""
    plans = []
    for glob, section in t.model_probe.items():
        where = f"{key}.model_probe.{glob}"
        if not glob:
            raise ConfigError(where, "a model glob must not be empty")
        plan, _, _ = resolve_probe([*layers, section], where)
        plans.append(ModelPlan(glob, plan if getattr(section, "enabled", True) else None))
    for name in ("include", "exclude"):
        if any(not glob for glob in getattr(t.models, name)):
            raise ConfigError(f"{key}.models.{name}", "a model glob must not be empty")
    return ModelRules(tuple(t.models.include), tuple(t.models.exclude), tuple(plans))


def _check_telemetry_path(path: str) -> None:
    if not path.startswith("/") or path == "/":
        raise ConfigError("web.telemetry_path", "must be a path like /metrics")
    if path == "/healthz":
        # The health check answers without basic auth (exporter.web.webconfig.secure_app):
        # metrics there would be served to anyone.
        problem = "/healthz is the health check's path, open without basic auth; use /metrics"
        raise ConfigError("web.telemetry_path", problem)


def _check_listen_address(address: str) -> None:
    try:
        split_listen_address(address)
    except ValueError as exc:
        raise ConfigError("web.listen_address", str(exc)) from exc


def _message(error: Any) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key"
    if kind == "missing":
        return "required key is missing"
    return str(error["msg"]).removeprefix("Value error, ")


def load_config(overrides: dict[str, Any], config_file: Path | None) -> Config:
    """Layer `overrides` (from flags) over the environment over `config_file`, then resolve."""
    token = _config_file.set(config_file)
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        errors = exc.errors()
        more = f" (and {len(errors) - 1} more problems)" if len(errors) > 1 else ""
        loc = ".".join(str(part) for part in errors[0]["loc"])
        raise ConfigError(loc, _message(errors[0]) + more) from None
    except ValueError as exc:  # pydantic-settings' own parse errors (e.g. bad JSON in env)
        raise ConfigError("environment", str(exc).splitlines()[0]) from None
    finally:
        _config_file.reset(token)
    return resolve(settings)
