"""One registry style for everything looked up by name (models, alignment metrics, datasets,
references): a read-only mapping filled by ``register``, whose ``get`` names the accepted
keys when a name is unknown. Production code looks things up here; nothing keeps its own
list of names (the shared vocabulary those names must match is in ``records``)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Mapping[str, T], Generic[T]):
    """``kind`` names what is registered ("model", "alignment metric", ...) in messages."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, item: T | None = None):
        """``register(name, item)`` adds ``item``; ``@register(name)`` decorates it. A name is
        registered once."""
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return add if item is None else add(item)

    def get(self, name: str) -> T:  # type: ignore[override]
        """The item named ``name``; ValueError listing the accepted names otherwise."""
        try:
            return self._items[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown {self.kind} {name!r}; accepted: "
                             f"{', '.join(sorted(self._items))}") from None

    def build(self, name: str, /, **options) -> object:
        """For registries of builders: ``get(name)(**options)``."""
        builder: Callable = self.get(name)  # type: ignore[assignment]
        return builder(**options)

    def __getitem__(self, name: str) -> T:
        return self._items[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._items)})"
