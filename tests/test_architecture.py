"""The layers of docs/architecture.md, checked on the source (``ast``, nothing imported).

- The layers, bottom up: featstore's subpackages (`io`, then `epic`, then `store` and `models`,
  `training` beside them, `extract` over those, `samples`), then `heads` (stage 2), `finetune`
  (stage 1: it reads heads' pure metrics only), `cli`. Each unit imports only the units listed as
  below it in ``ALLOWED``. The training engine (`featstore.training`) sits below both trainers'
  packages and imports no store, model or EPIC code. No library module imports the sample
  generators (`featstore.samples`: tests, benchmarks and the demo do).
- No import circle between our modules.
- No module reaches into another's private names (``_x``): what others need is public.

Every import counts, at the top of a module or inside a function (a lazy import is still a
dependency); only ``if TYPE_CHECKING:`` blocks, which never run, are left out.
"""
from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("featstore", "heads", "finetune", "cli")  # the packages, bottom up
ROOT = {"featstore"}  # featstore/__init__.py: the version, which anything may read
IO = ROOT | {"featstore.io"}
EPIC = IO | {"featstore.epic"}
STORE = EPIC | {"featstore.store"}
MODELS = EPIC | {"featstore.models"}
TRAINING = IO | {"featstore.training"}
EXTRACT = STORE | MODELS | {"featstore.extract"}
IMPORTS = STORE | {"featstore.imports"}
EXPORTS = IMPORTS | {"featstore.exports"}
DATA = STORE | {"featstore.data"}
LIBRARY = EXTRACT | TRAINING | EXPORTS | DATA  # all of featstore but the samples
# The layer units (featstore's subpackages, and the packages above it), and which units each may
# import besides itself: docs/architecture.md draws the same picture.
ALLOWED = {
    "featstore": set(),
    "featstore.io": ROOT,
    "featstore.epic": IO,
    "featstore.store": EPIC,
    "featstore.models": EPIC,
    "featstore.training": IO,
    "featstore.extract": STORE | MODELS,
    "featstore.imports": STORE,
    "featstore.exports": IMPORTS,  # the inverse of the imports: their key schemes and clocks
    "featstore.data": STORE,
    "featstore.samples": STORE | MODELS,
    "heads": LIBRARY,
    "finetune": LIBRARY | {"heads.metrics"},  # the metric definitions Table 1 uses; nothing else of heads
    "cli": LIBRARY | {"featstore.samples", "heads", "finetune"},
}
SAMPLES = "featstore.samples"  # sample data: for tests, benchmarks and the demo, not the libraries
SCANNED = (*PACKAGES, "tests", "benchmarks")  # where private names must not be reached into


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the module of ours it imports (the longest that exists)
    line: int
    names: tuple[str, ...] = ()  # the names taken from it (``from target import a, b``)


@cache
def modules() -> dict[str, Path]:
    """Dotted name -> file of every module under the scanned roots (packages as their __init__)."""
    found = {}
    for root in SCANNED:
        for path in sorted((REPO / root).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


@cache
def tree(module: str) -> ast.Module:
    return ast.parse(modules()[module].read_text(encoding="utf-8"), filename=str(modules()[module]))


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_nodes(node: ast.AST):
    """Every node below ``node`` except those under ``if TYPE_CHECKING:`` (its ``else`` counts)."""
    for child in ast.iter_child_nodes(node):
        if is_type_checking(child):
            for stmt in child.orelse:
                yield stmt
                yield from runtime_nodes(stmt)
            continue
        yield child
        yield from runtime_nodes(child)


def ours(name: str) -> str | None:
    """The longest module of ours that ``name`` (dotted) is or lies in, or None."""
    while name and name not in modules():
        name = name.rpartition(".")[0]
    return name or None


@cache
def imports(module: str) -> tuple[Import, ...]:
    """The imports of our modules that ``module`` makes at run time."""
    is_package = modules()[module].name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in runtime_nodes(tree(module)):
        if isinstance(node, ast.Import):
            found += [Import(module, target, node.lineno) for alias in node.names if (target := ours(alias.name))]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                # ``from featstore import samples`` imports the module featstore.samples.
                submodule = f"{source}.{alias.name}"
                if submodule in modules():
                    found.append(Import(module, submodule, node.lineno))
                elif target := ours(source):
                    found.append(Import(module, target, node.lineno, (alias.name,)))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in ("import_module", "__import__") and (target := ours(node.args[0].value)):
                found.append(Import(module, target, node.lineno))
    return tuple(i for i in found if i.target != module)


def package_of(module: str) -> str:
    return module.split(".")[0]


def unit_of(module: str) -> str:
    """The layer unit ``module`` belongs to: a featstore subpackage, or a package above it."""
    parts = module.split(".")
    if parts[0] == "featstore" and len(parts) > 1 and f"featstore.{parts[1]}" in ALLOWED:
        return f"featstore.{parts[1]}"
    return parts[0]


def allowed(importer: str, target: str) -> bool:
    """Whether module ``importer`` may import module ``target`` (both ours)."""
    unit = unit_of(importer)
    return unit_of(target) == unit or unit_of(target) in ALLOWED[unit] or \
        any(target == a or target.startswith(a + ".") for a in ALLOWED[unit] if a not in ALLOWED)


def library_modules() -> list[str]:
    return [m for m in modules() if package_of(m) in PACKAGES]


def shown(module: str) -> str:
    """A module's file, relative to the repository when it lies in it."""
    path = modules()[module]
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def where(imp: Import) -> str:
    return f"{shown(imp.module)}:{imp.line}"


# ------------------------------------------------------------------------------------------------
# layers


def test_each_package_imports_only_the_layers_below_it() -> None:
    wrong = [f"{where(i)}: {unit_of(i.module)} imports {i.target}"
             for m in library_modules() for i in imports(m) if not allowed(m, i.target)]
    assert not wrong, "imports across the layers (docs/architecture.md):\n" + "\n".join(wrong)


def test_every_featstore_subpackage_is_a_layer_unit() -> None:
    found = {f"featstore.{path.parent.name}" for path in (REPO / "featstore").glob("*/__init__.py")}
    assert found == {unit for unit in ALLOWED if unit.startswith("featstore.")}, \
        "a new featstore subpackage takes its place in ALLOWED (and in docs/architecture.md)"


@pytest.mark.parametrize("importer, target, expected", [
    ("featstore.store.reader", "featstore.epic.annotations", True),
    ("featstore.epic.objects", "featstore.extract.plan", False),
    ("featstore.training.engine", "featstore.store.reader", False),
    ("featstore.models.backbones", "featstore.store.schema", False),
    ("featstore.imports.rulstm", "featstore.store.writer", True),
    ("featstore.store.importer", "featstore.imports.registry", False),
    ("featstore.exports.formats", "featstore.imports.rulstm", True),
    ("featstore.imports.rulstm", "featstore.exports.formats", False),
    ("featstore.data.dataset", "featstore.store.reader", True),
    ("featstore.data.dataset", "featstore.extract.plan", False),
    ("finetune.backbone", "heads.metrics", True),
    ("finetune.backbone", "heads.evaluation", False),
    ("heads.trainer", "featstore.training.engine", True),
    ("heads.trainer", "featstore.samples.kitchens", False),
    ("cli.demo", "finetune.backbone", True),
])
def test_the_layer_rule(importer: str, target: str, expected: bool) -> None:
    assert allowed(importer, target) is expected


def test_no_library_module_imports_the_sample_generators() -> None:
    wrong = [f"{where(i)}: {i.module} imports {i.target}"
             for m in library_modules() if not (m == SAMPLES or m.startswith(SAMPLES + ".") or package_of(m) == "cli")
             for i in imports(m) if i.target == SAMPLES or i.target.startswith(SAMPLES + ".")]
    assert not wrong, "featstore.samples is sample data for tests, benchmarks and the demo:\n" + "\n".join(wrong)


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one node (or one with a self-loop)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        # Iterative depth-first search: the graph may be deeper than Python's recursion limit.
        work = [(node, iter(sorted(graph.get(node, ()))))]
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        while work:
            current, successors = work[-1]
            advanced = False
            for nxt in successors:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph.get(nxt, ())))))
                    advanced = True
                    break
                if nxt in on_stack:
                    low[current] = min(low[current], index[nxt])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[current])
            if low[current] == index[current]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == current:
                        break
                if len(component) > 1 or current in graph.get(current, ()):
                    components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def test_strongly_connected_finds_circles_and_only_circles() -> None:
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert sorted(strongly_connected({"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": {"e"}, "e": {"d"}})) == \
        [["a", "b", "c"], ["d", "e"]]
    chain = {str(i): {str(i + 1)} for i in range(5000)}  # deeper than the recursion limit
    chain["5000"] = {"0"}
    assert [len(c) for c in strongly_connected(chain)] == [5001]


def test_no_import_circle_between_our_modules() -> None:
    graph: dict[str, set[str]] = defaultdict(set)
    for m in modules():
        for i in imports(m):
            graph[m].add(i.target)
    circles = strongly_connected(graph)
    lines = []
    for circle in circles:
        members = set(circle)
        lines.append(" <-> ".join(circle))
        lines += sorted({f"  {where(i)}: {i.module} imports {i.target}"
                         for m in circle for i in imports(m) if i.target in members})
    assert not circles, "import circles (give the shared part a module of its own):\n" + "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# private names


def is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name != "_"


@cache
def private_definitions() -> dict[str, set[str]]:
    """Private name -> the modules that define it (functions, classes, methods, assigned names)."""
    defined: dict[str, set[str]] = defaultdict(set)
    for m in modules():
        for node in ast.walk(tree(m)):
            names = []
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names = [node.name]
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    for leaf in ast.walk(target):
                        if isinstance(leaf, ast.Name):
                            names.append(leaf.id)
                        elif isinstance(leaf, ast.Attribute):
                            names.append(leaf.attr)
            for name in names:
                if is_private(name):
                    defined[name].add(m)
    return defined


def module_aliases(m: str) -> dict[str, str]:
    """Local name -> module of ours, for names bound to one of our modules by an import."""
    aliases = {}
    for node in ast.walk(tree(m)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in modules():
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                if f"{node.module}.{alias.name}" in modules():
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
    return aliases


def private_reaches(m: str) -> list[str]:
    """Where module ``m`` uses a private name of another module of ours."""
    found = []
    path = shown(m)
    aliases = module_aliases(m)
    defined = private_definitions()
    for node in ast.walk(tree(m)):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level and ours(node.module):
            found += [f"{path}:{node.lineno}: from {node.module} import {a.name}"
                      for a in node.names if is_private(a.name) and ours(node.module) != m]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in ("self", "cls"):
                continue
            if isinstance(owner, ast.Call) and getattr(owner.func, "id", None) == "super":
                continue
            if isinstance(owner, ast.Name) and owner.id in aliases:
                if aliases[owner.id] != m:
                    found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
            elif defined.get(node.attr) and m not in defined[node.attr]:
                # An attribute of an object whose private name only other modules of ours define.
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)} (defined in {', '.join(sorted(defined[node.attr]))})")
        elif isinstance(node, ast.Call) and len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                and isinstance(node.args[1].value, str) and is_private(node.args[1].value):
            # setattr / getattr / monkeypatch.setattr(module, "_name", ...)
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            target = node.args[0]
            if name in ("setattr", "getattr", "delattr") and isinstance(target, ast.Name) \
                    and aliases.get(target.id, m) != m:
                found.append(f"{path}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_reaches_into_another_modules_private_names() -> None:
    found = [line for m in modules() for line in private_reaches(m)]
    assert not found, "private names used across modules (make them public or move the caller):\n" + "\n".join(found)


@pytest.mark.parametrize("source, expected", [
    ("from featstore.store.reader import _holds_store_data\n", 1),
    ("from featstore.store import reader\nreader._shard_name_ok('0')\n", 1),
    ("def f(opened):\n    return opened._shard_dirs()\n", 1),
    ("def f(monkeypatch):\n    from featstore.io import allocator\n    monkeypatch.setattr(allocator, '_x', 1)\n", 1),
    ("from featstore.store.reader import FeatureStore\nclass A:\n    def f(self):\n        return self._y, super()._z\n", 0),
    ("import numpy as np\nnp._private_thing\n", 0),
])
def test_the_private_name_check_sees_each_kind_of_reach(tmp_path: Path, source: str, expected: int,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    name = "tests.architecture_probe"
    probe = tmp_path / "probe.py"
    probe.write_text(source)
    monkeypatch.setitem(modules(), name, probe)
    tree.cache_clear()
    try:
        assert len(private_reaches(name)) == expected, private_reaches(name)
    finally:
        tree.cache_clear()


# ------------------------------------------------------------------------------------------------
# constants defined once


def spelled_constants(m: str) -> list[str]:
    """Where module ``m`` spells out a constant that has a home elsewhere."""
    from featstore.epic.metadata import NUM_CLASSES
    from featstore.epic.frames import MODALITY_CHANNELS
    from featstore.store.schema import BOX_SETS, CANONICAL_FIELDS

    homes = {"field name": "featstore.store.schema", "box sets": "featstore.store.schema",
             "class counts": "featstore.epic.metadata", "modality channels": "featstore.epic.frames"}
    found = []
    for node in ast.walk(tree(m)):
        what = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in CANONICAL_FIELDS:
            what = "field name"
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant) \
                and str(node.values[0].value).startswith("det."):
            what = "field name"  # f"det.{box_set}.box": featstore.store.schema.det_field
        elif isinstance(node, (ast.Tuple, ast.List)) and node.elts and all(isinstance(e, ast.Constant) for e in node.elts):
            values = tuple(e.value for e in node.elts)
            what = "box sets" if values == BOX_SETS else "class counts" if values in NUM_CLASSES.values() else None
        elif isinstance(node, ast.Dict) and node.keys and all(isinstance(k, ast.Constant) for k in node.keys) \
                and all(isinstance(v, ast.Constant) for v in node.values):
            if {k.value: v.value for k, v in zip(node.keys, node.values)} == MODALITY_CHANNELS:
                what = "modality channels"
        if what and homes[what] != m:
            found.append(f"{shown(m)}:{node.lineno}: {ast.unparse(node)} (a {what}: take it from {homes[what]})")
    return found


def test_shared_constants_are_spelled_only_where_they_are_defined() -> None:
    # Tests keep their literals: they check the contract (a renamed field must fail them).
    found = [line for m in modules() if package_of(m) in (*PACKAGES, "benchmarks") for line in spelled_constants(m)]
    assert not found, "constants spelled out instead of imported:\n" + "\n".join(found)


# ------------------------------------------------------------------------------------------------
# one name, one thing


def test_no_two_modules_define_a_class_of_the_same_name() -> None:
    # A leading underscore does not make another name: `_Progress` and `Progress` are one name.
    defined: dict[str, list[str]] = defaultdict(list)
    for m in library_modules():
        for node in ast.walk(tree(m)):
            if isinstance(node, ast.ClassDef):
                defined[node.name.lstrip("_")].append(f"{shown(m)}:{node.lineno}")
    shared = {name: places for name, places in defined.items() if len(places) > 1}
    assert not shared, "classes of one name in several places (rename one):\n" + \
        "\n".join(f"{name}: {', '.join(places)}" for name, places in sorted(shared.items()))
