"""The library's shape: imports go one way (no circles, training never imports the evaluation), modules stay
small enough to read, recipes stay short."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "align_kit"
MODULES = {p.stem: p for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
RECIPES = sorted(p for p in (ROOT / "recipes").glob("*.py") if p.stem != "__init__")

# What trains a model and what judges one; the orchestrators (cli, demo, loss_sweep, loss_search) use both.
TRAINING = {
    "adapters", "callbacks", "configs", "data", "dpo_chunked", "files", "formats", "generation", "grpo", "guards",
    "logprobs", "ref_cache",
    "losses", "models", "parsing", "ppo", "prompts", "quiet", "resources", "reward_funcs", "rewards", "runs", "task",
}  # fmt: skip
EVALUATION = {
    "answers", "audits", "eval_args", "evaluation", "judge_backends", "judge_cache", "judge_config",
    "judge_openai", "judge_setup", "judges", "leaderboard", "plots", "ratings", "reports", "stats", "verdicts",
}  # fmt: skip


def imported_modules(path: Path) -> set[str]:
    """Every align_kit module ``path`` imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module == "align_kit":
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("align_kit."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("align_kit.")}
    return found & set(MODULES)


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


def test_the_circle_finder_finds_a_circle_and_accepts_a_line():
    assert a_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert a_circle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert imported_modules(PACKAGE / "evaluation.py") >= {
        "answers",
        "audits",
        "reports",
    }  # the walk sees imports


def test_align_kit_imports_go_one_way():
    assert a_circle(GRAPH) is None


def test_every_module_is_filed_once_and_training_never_imports_the_evaluation():
    orchestrators = {
        "cli",
        "demo",
        "loss_sweep",
        "loss_search",
        "loss_checks",
        "loss_sandbox",
        "loss_discovery",
    }
    assert not TRAINING & EVALUATION
    assert set(MODULES) == TRAINING | EVALUATION | orchestrators  # a new module is placed on purpose
    crossings = {name: sorted(GRAPH[name] & EVALUATION) for name in TRAINING if GRAPH[name] & EVALUATION}
    assert crossings == {}
    for recipe in RECIPES:
        assert not imported_modules(recipe) & EVALUATION, recipe.name


def test_modules_and_recipes_stay_short():
    long_modules = {
        name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > 500
    }
    long_recipes = {p.name: n for p in RECIPES if (n := len(p.read_text().splitlines())) > 150}
    assert long_modules == {} and long_recipes == {}
