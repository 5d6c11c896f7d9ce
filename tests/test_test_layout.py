"""How the tests are laid out: what they share lives in conftest.py files (fixtures) and helper
modules (tests/helpers/, tests/reliability/{faults,forkserver,invariants,store_processes,workloads}.py),
never in a test module;
and torch's thread count is set by the `one_thread` fixture, not by each module."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def _module_file(root: Path, dotted: str) -> Path | None:
    """The file a dotted module name resolves to under ``root``, if it is one of ours."""
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _package_of(root: Path, path: Path) -> str:
    return ".".join(path.relative_to(root).parent.parts)


def imported_test_modules(root: Path, path: Path) -> list[str]:
    """``"line: module"`` for each import in ``path`` that loads a test module (``test_*.py``).

    ``from a.b import c`` loads ``a.b.c`` when that is a module; relative imports are resolved
    against the file's package.
    """
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = _package_of(root, path).split(".")
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            names = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            target = _module_file(root, name)
            if target is not None and target.name.startswith("test_") and target != path:
                found.append(f"{node.lineno}: {name}")
    return found


def threads_set_by_hand(path: Path) -> list[int]:
    """Lines of ``path`` that call ``torch.set_num_threads`` (code, not text inside strings)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [node.lineno for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
            and node.func.attr == "set_num_threads"]


def test_no_module_of_the_tests_imports_a_test_module() -> None:
    offenders = {str(path.relative_to(ROOT)): found for path in sorted(TESTS.rglob("*.py"))
                 if (found := imported_test_modules(ROOT, path))}
    assert offenders == {}, (
        "move what these imports share into a conftest.py (fixtures) or tests/helpers/ (plain functions)"
    )


def test_test_modules_leave_the_thread_count_to_the_one_thread_fixture() -> None:
    offenders = {str(path.relative_to(ROOT)): lines for path in sorted(TESTS.rglob("test_*.py"))
                 if (lines := threads_set_by_hand(path))}
    assert offenders == {}, 'use pytestmark = pytest.mark.usefixtures("one_thread") (tests/conftest.py)'


@pytest.mark.parametrize("source, expected", [
    ("from tests.pkg.test_other import helper\n", ["1: tests.pkg.test_other"]),
    ("import os\nfrom tests.pkg import test_other\n", ["2: tests.pkg.test_other"]),
    ("import tests.pkg.test_other as other\n", ["1: tests.pkg.test_other"]),
    ("from .test_other import helper\n", ["1: tests.pkg.test_other"]),
    ("def f():\n    from ..pkg.test_other import helper\n", ["2: tests.pkg.test_other"]),
    ("from tests.pkg.helpers import helper\nfrom tests.pkg import helpers, conftest\n", []),
    ("from tests.pkg.test_this import x\ntext = 'from tests.pkg.test_other import helper'\n", []),
])
def test_the_import_check_finds_test_modules_however_they_are_imported(tmp_path: Path, source: str,
                                                                        expected: list[str]) -> None:
    package = tmp_path / "tests" / "pkg"
    package.mkdir(parents=True)
    for name in ("__init__.py", "helpers.py", "conftest.py", "test_other.py"):
        (package / name).write_text("helper = 1\n")
    (tmp_path / "tests" / "__init__.py").write_text("")
    module = package / "test_this.py"
    module.write_text(source)
    assert imported_test_modules(tmp_path, module) == expected


def test_the_thread_check_sees_calls_but_not_strings(tmp_path: Path) -> None:
    module = tmp_path / "test_x.py"
    module.write_text("import torch\nSCRIPT = 'torch.set_num_threads(1)'\n\ndef f():\n    torch.set_num_threads(1)\n")
    assert threads_set_by_hand(module) == [5]
