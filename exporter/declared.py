"""A setting declared once, as a plain dataclass field: its default, bounds and meaning.

The values the daemon runs with (`MeasurePlan`, `Schedule`, `RequestLimits`) are frozen
dataclasses that check themselves when built, whoever builds them: the settings layer, `bench`,
the daemon reading its handed-over configuration (`exporter.serve`), a test. So the daemon's
own process never imports pydantic (some 10 MiB it would carry for months), and there is one
check per bound. The settings layer reads the same declarations for its flags, environment
variables and file keys, and only parses text into types (`exporter.config.settings`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self

_SPEC: Final = "setting"


@dataclass(frozen=True)
class Spec:
    """One setting's declaration; the bounds apply to each item of a tuple."""

    description: str
    gt: float | None = None
    ge: float | None = None
    le: float | None = None
    # After the bounds: returns the value to keep (e.g. sorted), or raises ValueError.
    normalise: Callable[[Any], Any] | None = None

    def problem(self, value: Any) -> str | None:
        """Why `value` is out of bounds, in pydantic's words (the settings layer's errors read
        the same for a type and a bound); None if it is not."""
        if value is None or isinstance(value, bool) or not isinstance(value, int | float):
            return None
        if isinstance(value, float) and not math.isfinite(value):
            return "Input should be a finite number"
        if self.gt is not None and not value > self.gt:
            return f"Input should be greater than {_number(self.gt)}"
        if self.ge is not None and not value >= self.ge:
            return f"Input should be greater than or equal to {_number(self.ge)}"
        if self.le is not None and not value <= self.le:
            return f"Input should be less than or equal to {_number(self.le)}"
        return None


def _number(bound: float) -> str:
    return f"{bound:g}" if isinstance(bound, float) and not bound.is_integer() else f"{bound:.0f}"


def setting(
    default: Any,
    description: str,
    *,
    gt: float | None = None,
    ge: float | None = None,
    le: float | None = None,
    normalise: Callable[[Any], Any] | None = None,
) -> Any:
    """A dataclass field that `Declared` checks. Typed Any, as `dataclasses.field` is, so that
    it can stand as any field's default in a class body."""
    spec = Spec(description, gt=gt, ge=ge, le=le, normalise=normalise)
    return dataclasses.field(default=default, metadata={_SPEC: spec})


def spec_of(field: dataclasses.Field[Any]) -> Spec:
    spec = field.metadata.get(_SPEC)
    if not isinstance(spec, Spec):
        raise TypeError(f"{field.name} is not declared with setting()")
    return spec


class SettingError(ValueError):
    """A value outside its declaration; `loc` is the field (`depths.1` for a tuple's item),
    or empty where the whole value is at fault."""

    def __init__(self, loc: str, problem: str) -> None:
        super().__init__(f"{loc}: {problem}" if loc else problem)
        self.loc = loc
        self.problem = problem


class Declared:
    """Checks a frozen dataclass of `setting()` fields when it is built."""

    __slots__ = ()
    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            spec = spec_of(field)
            value = getattr(self, field.name)
            items = enumerate(value) if isinstance(value, tuple | list) else ()
            for loc, item in [(field.name, value), *((f"{field.name}.{i}", v) for i, v in items)]:
                if (problem := spec.problem(item)) is not None:
                    raise SettingError(loc, problem)
            if spec.normalise is not None:
                try:
                    kept = spec.normalise(value)
                except ValueError as exc:
                    raise SettingError(field.name, str(exc)) from None
                object.__setattr__(self, field.name, kept)  # frozen: set once, while built
        self.check()

    def check(self) -> None:
        """Rules over several fields; raise SettingError with an empty `loc`."""

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def pick(cls, values: dict[str, Any]) -> Self:
        """Built from those of `values` that are this class's fields."""
        names = cls.field_names()
        return cls(**{k: v for k, v in values.items() if k in names})

    def as_json(self) -> dict[str, Any]:
        """Field by field, tuples as lists: JSON's and YAML's plain types."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }
