"""Layers: `finetune` sits above `featstore` and `heads`; neither imports it (nor featstore heads)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def imported_packages(package: str) -> dict[str, set[str]]:
    """Top-level packages each module of ``package`` imports (absolute imports, anywhere in the file)."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [("featstore", {"finetune", "heads", "cli"}),
                                                ("heads", {"finetune", "cli"}),
                                                ("finetune", {"cli"})])
def test_lower_layers_never_import_higher_ones(package: str, forbidden: set[str]) -> None:
    offending = {module: sorted(names & forbidden) for module, names in imported_packages(package).items()
                 if names & forbidden}
    assert not offending, f"{package} imports a higher layer: {offending}"
