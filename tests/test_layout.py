"""The library's shape: one folder per layer, imports only to a lower rank or inside the same folder (no
circles; `training/` and `judges/` never import each other; the evaluation never imports training), modules
small enough to read, recipes short."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "align_kit"
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__")

# A unit is a top-level module or a folder; it may import units of a lower rank, and modules of its own folder.
RANKS = {
    "console": 0, "files": 0, "resources": 0,
    "configs": 1,
    "parsing": 2,
    "data": 3,
    "models": 4,
    "training": 5, "judges": 5,
    "evaluation": 6,
    "loss_lab": 7,
    "cli": 8, "demo": 8,
}  # fmt: skip


def module_name(path: Path) -> str:
    """``align_kit/models/loading.py`` -> ``models.loading``; ``align_kit/files.py`` -> ``files``."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py") if p.stem != "__init__"}


def unit(module: str) -> str:
    return module.split(".")[0]


def imported_modules(path: Path) -> set[str]:
    """Every align_kit module ``path`` imports, at the top or inside a function (``models.loading``, ``files``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "align_kit":
            base = node.module.removeprefix("align_kit").lstrip(".")
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if base else alias.name)
            found.add(base)
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("align_kit.") for a in node.names if a.name.startswith("align_kit.")
            }
    return {name for name in found if name in MODULES}


GRAPH = {name: imported_modules(path) - {name} for name, path in MODULES.items()}


def a_circle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path that ends where it starts, or None (depth-first search, three colours)."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (circle := visit(nxt, [*path, nxt])):
                return circle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (circle := visit(start, [start])):
            return circle
    return None


def upward(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Imports that go to a higher or equal rank outside the importer's own folder."""
    bad = {}
    for name, targets in graph.items():
        wrong = [t for t in sorted(targets) if unit(t) != unit(name) and RANKS[unit(t)] >= RANKS[unit(name)]]
        if wrong:
            bad[name] = wrong
    return bad


def test_the_checks_find_a_circle_and_an_upward_import():
    assert a_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert a_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert imported_modules(PACKAGE / "evaluation" / "pipeline.py") >= {
        "evaluation.answers",
        "evaluation.audits",
        "evaluation.reports",
    }  # the walk sees imports
    assert upward({"models.loading": {"training.runs"}, "training.runs": {"judges.protocol"}}) == {
        "models.loading": ["training.runs"],
        "training.runs": ["judges.protocol"],
    }
    assert upward({"evaluation.pipeline": {"judges.protocol", "evaluation.stats", "files"}}) == {}


def test_align_kit_imports_go_one_way():
    assert a_circle(GRAPH) is None


def test_every_module_sits_in_a_ranked_folder_and_imports_only_downward():
    assert {unit(name) for name in MODULES} == set(
        RANKS
    )  # a new folder or top-level module is ranked on purpose
    assert all(name.count(".") <= 1 for name in MODULES)  # one folder level
    assert upward(GRAPH) == {}


def test_recipes_never_import_the_evaluation_or_the_loss_lab_internals():
    for recipe in RECIPES:
        reached = {unit(m) for m in imported_modules(recipe)}
        if recipe.stem not in ("loss_sweep", "discover_loss"):
            assert not reached & {"evaluation", "loss_lab"}, recipe.name


def test_no_package_init_re_exports():
    for init in PACKAGE.rglob("__init__.py"):
        assert init.read_text().strip() == "" or init.read_text().lstrip().startswith('"""'), init


def test_modules_and_recipes_stay_short():
    long_modules = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 500
    }
    long_recipes = {p.name: n for p in RECIPES if (n := len(p.read_text().splitlines())) > 150}
    assert long_modules == {} and long_recipes == {}
