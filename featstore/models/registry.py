"""A tiny name -> entry registry (timm style): a dict and a decorator that refuses duplicate names.

Backbones and detectors each keep one `Registry`; modules register their builders at import time
(``featstore.models`` imports them all), and tests parametrise over ``names()`` so a newly
registered model is tested the moment it exists.
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Generic, TypeVar

EntryT = TypeVar("EntryT")


class UnknownModelError(LookupError):
    """A spec names a model that is not registered."""


class Registry(Generic[EntryT]):
    """Maps model names to entries (records plus builders).

    Args:
        kind: what the entries are ("backbone", "detector"), for messages.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, EntryT] = {}

    def add(self, name: str, entry: EntryT) -> None:
        """Register ``entry`` under ``name``.

        Raises:
            ValueError: ``name`` is already registered (two models silently sharing a name would
                make stores ambiguous about which one produced their features).
        """
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = entry

    def get(self, name: str) -> EntryT:
        """The entry registered under ``name``.

        Raises:
            UnknownModelError: not registered; the message lists what is.
        """
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names()) or "none"
            raise UnknownModelError(f"unknown {self.kind} {name!r}; registered: {known}") from None

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._entries)
