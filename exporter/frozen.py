"""Values that never change once made, shared rather than copied by `copy.deepcopy`.

Each scrape takes one deep copy of the store (`exporter.state.store.Store.snapshot`), so that
it renders one consistent moment while the prober writes the next. The results, server
descriptions and model facts in it are frozen dataclasses that nothing mutates after they are
built: copying them cost most of a snapshot's time and allocations, for nothing.
"""

from __future__ import annotations

from typing import Any, Self


class Frozen:
    """Mixin for frozen dataclasses whose fields are never mutated after construction."""

    __slots__ = ()

    def __deepcopy__(self, memo: dict[int, Any]) -> Self:
        return self
