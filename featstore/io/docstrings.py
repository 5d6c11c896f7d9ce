"""What a Google-style docstring says of each argument: the help text registries give their options.

The head registry (a head's switches) and the import-format registry (a format's options) both
turn a builder's documented arguments into command-line help, so an option cannot exist without
its line of documentation.
"""
from __future__ import annotations

import inspect
import re
from typing import Any, Callable

__all__ = ["documented_args"]


def documented_args(func: Callable[..., Any]) -> dict[str, str]:
    """``name -> text`` of the ``Args:`` section of ``func``'s docstring, continuation lines joined.

    Args:
        func: a function with a Google-style docstring (``Args:`` then ``name: text`` lines, a
            ``name (type): text`` form too, indented continuations).
    Returns:
        Each documented argument's text; empty when there is no ``Args:`` section.
    """
    doc = inspect.getdoc(func) or ""
    out: dict[str, str] = {}
    inside, indent, current = False, None, None
    for line in doc.splitlines():
        if not inside:
            inside = line.strip() == "Args:"
            continue
        if line.strip() and not line.startswith((" ", "\t")):
            break  # the next section (Returns:, Raises:)
        if not line.strip():
            continue
        width = len(line) - len(line.lstrip())
        indent = width if indent is None else indent
        match = re.match(r"\s*(\w+)(?: \([^)]*\))?:\s*(.*)", line)
        if width == indent and match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current is not None:
            out[current] = f"{out[current]} {line.strip()}".strip()
    return out
