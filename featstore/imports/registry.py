"""The import formats: a name -> reader table that `featstore import --format NAME` and the tests read.

Like the backbone and head registries: a dict and a decorator that refuses duplicate names. A
format's reader is an opener, ``open(source, **options) -> PublishedSource``, whose keyword-only
arguments are the format's options (documented in its ``Args:``, which the CLI shows as their help).
A `PublishedSource` names the store fields it fills and reads one segment at a time on the seconds
clock (`featstore.imports.timing`); the import loop (`featstore.imports.service`) does the rest.
"""
from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from featstore.io.docstrings import documented_args
from featstore.imports.timing import SegmentSpan
from featstore.store.importer import ImportFailure
from featstore.store.schema import FieldSpec

__all__ = [
    "FormatOption",
    "ImportFormat",
    "PublishedSource",
    "all_options",
    "get_format",
    "list_formats",
    "register_format",
]


class PublishedSource:
    """A published feature set opened for import.

    Attributes:
        fields: the store fields it fills, with their dtypes and shapes.
    """

    fields: dict[str, FieldSpec]

    def describe(self) -> dict[str, Any]:
        """The manifest's ``publisher`` entry: layout, the publisher's dims, the options in force.

        Equal for equal sources and options: a rerun into the same store compares it.
        """
        raise NotImplementedError

    def read(self, span: SegmentSpan) -> dict[str, np.ndarray]:
        """The fields of one segment.

        Raises:
            SegmentSkipped: nothing of the segment is in the source (the reason says what was looked for).
            ImportFailure: the source disagrees with itself (a file of other dims): the import stops.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release files and environments."""


@dataclass(frozen=True)
class ImportFormat:
    """One registered format.

    Attributes:
        name: the registry key (``--format NAME``).
        description: one line for ``--help``.
        source: what ``--from`` names for it.
        opener: ``opener(source, **options) -> PublishedSource``; None for a format that names its
            own fields per segment (``npz``), which `featstore.store.importer` imports itself.
    """

    name: str
    description: str
    source: str
    opener: Callable[..., PublishedSource] | None = None

    def options(self) -> dict[str, Any]:
        """The format's options and their defaults (the opener's keyword-only arguments)."""
        if self.opener is None:
            return {}
        return {p.name: p.default for p in inspect.signature(self.opener).parameters.values()
                if p.kind is inspect.Parameter.KEYWORD_ONLY}

    def option_types(self) -> dict[str, type]:
        """Each option's value type (``int`` for ``int | None``), from the opener's annotations."""
        if self.opener is None:
            return {}
        types = {}
        for p in inspect.signature(self.opener).parameters.values():
            if p.kind is not inspect.Parameter.KEYWORD_ONLY:
                continue
            text = str(p.annotation)
            types[p.name] = next((t for t in (bool, int, float) if re.search(rf"\b{t.__name__}\b", text)), str)
        return types

    def option_help(self) -> dict[str, str]:
        """One line per option, from the opener's ``Args:`` docstring."""
        documented = documented_args(self.opener) if self.opener is not None else {}
        return {name: documented.get(name, "") for name in self.options()}

    def check_options(self, options: Mapping[str, Any]) -> None:
        """Raise `ImportFailure` naming every option this format does not take."""
        unknown = sorted(set(options) - set(self.options()))
        if unknown:
            known = ", ".join(f"--{n.replace('_', '-')}" for n in sorted(self.options())) or "none"
            given = ", ".join(f"--{n.replace('_', '-')}" for n in unknown)
            raise ImportFailure(f"--format {self.name} does not take {given}; its options are: {known}")


_FORMATS: dict[str, ImportFormat] = {}


def register_format(name: str, *, description: str, source: str) -> Callable[..., Any]:
    """Decorator that registers an opener under ``name`` (applied to None: a format without one).

    Args:
        name: the registry key.
        description: one line.
        source: what ``--from`` names.
    Raises:
        ValueError: the name is taken, or an option has no line in the opener's ``Args:``.
    """

    def decorate(func: Callable[..., PublishedSource] | None) -> Callable[..., PublishedSource] | None:
        if name in _FORMATS:
            raise ValueError(f"an import format named {name!r} is already registered")
        record = ImportFormat(name=name, description=description, source=source, opener=func)
        undocumented = [option for option, text in record.option_help().items() if not text]
        if undocumented:
            raise ValueError(f"import format {name!r}: option(s) {', '.join(undocumented)} have no line in the "
                             f"opener's Args: docstring")
        _FORMATS[name] = record
        return func

    return decorate


def list_formats() -> list[str]:
    """Names of all registered formats, ``npz`` first, then sorted."""
    return sorted(_FORMATS, key=lambda n: (n != "npz", n))


def get_format(name: str) -> ImportFormat:
    """The record of format ``name``.

    Raises:
        ImportFailure: an unknown name, listing the known ones.
    """
    try:
        return _FORMATS[name]
    except KeyError:
        raise ImportFailure(f"unknown import format {name!r}; known formats: {', '.join(list_formats())}") from None


@dataclass(frozen=True)
class FormatOption:
    """An option as the CLI offers it: one name over every format that takes it.

    Attributes:
        name: the opener argument (flag ``--name``).
        kind: its value type.
        help: per format, ``"format (default d): text"`` joined.
        formats: the formats that take it.
    """

    name: str
    kind: type
    help: str
    formats: tuple[str, ...]


def all_options() -> dict[str, FormatOption]:
    """Every option any registered format takes, by name (sorted), for the CLI."""
    found: dict[str, FormatOption] = {}
    for name in list_formats():
        record = _FORMATS[name]
        helps, types = record.option_help(), record.option_types()
        for option, default in record.options().items():
            shown = "" if default in (None, "") else f" (default {default!r})"
            text = f"{name}{shown}: {helps[option].rstrip('.')}"
            if option in found:
                known = found[option]
                found[option] = FormatOption(option, known.kind, f"{known.help}; {text}", known.formats + (name,))
            else:
                found[option] = FormatOption(option, types[option], text, (name,))
    return dict(sorted(found.items()))
