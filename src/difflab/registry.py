"""One registry type for every named kind of part: processes, predictions, schedules, samplers,
guidance methods, networks, text encoders, feature extractors and datasets.

Each kind keeps one :class:`Registry`; ``get`` fails with the names that exist, ``available`` lists
them in registration order, ``reference`` gives the paper, and ``difflab info`` walks
:data:`KINDS` (every registry in the order they were made) instead of knowing each module.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")

#: every registry made, by kind, in the order modules create them
KINDS: dict[str, Registry] = {}


class Registry(Generic[T]):
    """Named entries of one kind, each with the paper (or a one-line description) it implements."""

    def __init__(self, kind: str):
        if kind in KINDS:
            raise ValueError(f"a registry of {kind!r} already exists")
        self.kind = kind
        self._entries: dict[str, tuple[T, str]] = {}
        KINDS[kind] = self

    def add(self, name: str, entry: T, reference: str = "") -> T:
        """Register ``entry`` under ``name``; a name is registered once."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = (entry, reference)
        return entry

    def register(self, name: str, reference: str = "") -> Callable[[T], T]:
        """Decorator form of :meth:`add`."""
        return lambda entry: self.add(name, entry, reference)

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self._entries)}")
        return self._entries[name][0]

    def reference(self, name: str) -> str:
        self.get(name)
        return self._entries[name][1]

    def available(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return ((name, entry) for name, (entry, _) in self._entries.items())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"
