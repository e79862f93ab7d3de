"""The table of settings: each one's flag, environment variable, file key, default and meaning.

Derived from the declarations (`Settings` and its sections, `Schedule` and `MeasurePlan` for
`probe`), never written by hand: the command line is built from it, and so is the README's
settings table (`tests/test_docs.py` checks it; `UPDATE_GOLDEN=1` rewrites it).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from pydantic import BaseModel
from pydantic.fields import FieldInfo

from exporter.config.settings import ENV_PREFIX, PROBE_SECTIONS, Settings
from exporter.declared import spec_of

# Spellings of earlier releases, still accepted with a warning: the probe flags had a dash
# where the Prometheus convention has a dot, as did --log-format and --log-level.
_DASHED_SECTIONS: Final = ("probe", "log")
_DASHED_PROBE_FLAGS: Final = frozenset(
    {
        "interval", "timeout", "jitter", "discovery_interval", "prompt_tokens",
        "generation_tokens", "depths", "repetitions", "slot", "duty_budget",
    }
)  # fmt: skip


@dataclass(frozen=True)
class Setting:
    path: tuple[str, ...]  # ("probe", "interval")
    help: str
    default: str  # as the README shows it
    flag: str
    metavar: str
    repeatable: bool = False
    deprecated_flags: tuple[str, ...] = ()

    @property
    def env(self) -> str:
        return ENV_PREFIX + "_".join(self.path).upper()

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, tuple | list):
        return "`" + ",".join(_shown(v).strip("`") for v in value) + "`"
    if isinstance(value, float) and value.is_integer():
        return f"`{int(value)}`"
    return f"`{value}`"


def _setting(
    path: tuple[str, ...], description: str, default: Any, extra: Mapping[str, Any]
) -> Setting:
    flag = str(extra.get("flag") or "--" + ".".join(p.replace("_", "-") for p in path))
    deprecated: tuple[str, ...] = ()
    if path[0] in _DASHED_SECTIONS and (path[0] != "probe" or path[-1] in _DASHED_PROBE_FLAGS):
        deprecated = ("--" + "-".join(p.replace("_", "-") for p in path),)
    return Setting(
        path=path,
        help=description,
        default=_shown(extra["shown"]) if "shown" in extra else _shown(default),
        flag=flag,
        metavar=str(extra.get("metavar") or path[-1].upper()),
        repeatable=bool(extra.get("repeatable")),
        deprecated_flags=deprecated,
    )


def _extra(field: FieldInfo) -> Mapping[str, Any]:
    return field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}


def _walk() -> Iterator[Setting]:
    for name, field in Settings.model_fields.items():
        extra = _extra(field)
        if "flag" in extra and extra["flag"] is None:
            continue  # file and environment only: secrets, the target list
        if name == "probe":  # the declared plans' fields (exporter.declared)
            for section in PROBE_SECTIONS:
                for declared in dataclasses.fields(section):
                    yield _setting(
                        (name, declared.name),
                        spec_of(declared).description,
                        declared.default,
                        {},
                    )
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, sub_field in annotation.model_fields.items():
                yield _setting((name, sub), sub_field.description or "", sub_field.default,
                               _extra(sub_field))  # fmt: skip
            continue
        yield _setting((name,), field.description or "", field.default, extra)


SETTINGS: Final[tuple[Setting, ...]] = tuple(_walk())


def markdown_table() -> str:
    """The README's settings table."""
    rows = [
        "| flag | environment | file key | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for s in SETTINGS:
        flag = f"`{s.flag} {s.metavar}`" + (" (repeatable)" if s.repeatable else "")
        env = f"`{s.env}`" + (" (comma-separated)" if s.repeatable else "")
        rows.append(f"| {flag} | {env} | `{s.key}` | {s.default} | {s.help} |")
    return "\n".join(rows) + "\n"
