"""Where align-kit finds its files: the shipped judges and configs, and the folder of generated assets.

The judges (``eval/judges``), the evaluation configs (``eval/configs``) and the recipe configs
(``recipes/configs``) are package data of the installed distribution: ``recipes/`` is installed as
``align_kit.recipes`` and ``eval/`` as ``align_kit.eval`` (see pyproject.toml), and both are found through
``importlib.resources``. In a checkout the same files are read where they are, so there is one copy.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[1]  # the repository, when running from a checkout
SHIPPED = {"recipes": "align_kit.recipes", "eval": "align_kit.eval"}  # folder -> installed package


def home() -> Path:
    """Folder for generated assets (embedded model, embedded task); ``$ALIGN_KIT_HOME`` overrides."""
    return Path(os.environ.get("ALIGN_KIT_HOME", Path.home() / ".cache" / "align_kit"))


def shipped(folder: str) -> Path:
    """The installed (or checked-out) ``recipes`` or ``eval`` folder."""
    try:
        return Path(str(importlib.resources.files(SHIPPED[folder])))
    except ModuleNotFoundError:  # a checkout on sys.path that was never installed
        return CHECKOUT / folder


def judges_dir() -> Path:
    """The shipped judges, one folder each."""
    return shipped("eval") / "judges"


def locate(path: str | Path) -> Path:
    """A repository-relative path such as ``recipes/sft.py`` or ``eval/configs/embedded.yaml``: the file
    itself when it exists from here, else the shipped copy of the installed package."""
    path = Path(path)
    if path.exists() or path.is_absolute() or not path.parts or path.parts[0] not in SHIPPED:
        return path
    return shipped(path.parts[0]).joinpath(*path.parts[1:])


def find_config(name_or_path: str) -> Path:
    """A config file: the path itself when it exists, else a shipped recipe or evaluation config named by
    its repository-relative path (``recipes/configs/dpo_tiny.yaml``), its file name or its stem
    (``dpo_tiny``). Raises FileNotFoundError listing where it looked."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if len(path.parts) > 1:
        candidates = [locate(path)]
    else:
        name = path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml"
        candidates = [shipped("recipes") / "configs" / name, shipped("eval") / "configs" / name]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no config {name_or_path!r}: not a file here, nor shipped ({looked})")


def load_script(path: Path, name: str):
    """Import a script (recipes are scripts, not a package) as module ``name``."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_recipe(recipe: str, name: str | None = None):
    """The shipped (or checked-out) recipe ``recipes/<recipe>.py`` as a module, imported once per ``name``:
    the one way the demo and the loss lab run a recipe."""
    name = name or f"align_kit_recipe_{recipe}"
    if name in sys.modules:
        return sys.modules[name]
    return load_script(shipped("recipes") / f"{recipe}.py", name)
