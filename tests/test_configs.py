"""Protects configs from drifting away from code: every YAML under recipes/configs parses with the
parser of the recipe its header names, and headers state the exact command."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, load_recipe

from align_kit.parsing import parse

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
HEADER = re.compile(r"^# accelerate launch (?:--config_file \S+ )?recipes/(\w+)\.py --config (\S+)")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_yaml_parses_with_its_recipe(path):
    match = HEADER.match(path.read_text().splitlines()[0])
    assert match, (
        f"{path.name}: first line must be the exact 'accelerate launch recipes/X.py --config' command"
    )
    recipe, named = match.groups()
    assert named == f"recipes/configs/{path.name}"
    module = load_recipe(recipe)
    # GPU configs ask for bf16, which transformers refuses on a CPU-only machine: parse them as CPU runs.
    parsed = parse(module.CONFIG, ["--config", str(path), "--use_cpu", "true", "--bf16", "false"])
    assert len(parsed) == len(module.CONFIG)
    assert parsed[-1].output_dir and parsed[-1].gradient_checkpointing is False  # TRL's default is on
    if "gpt2" not in path.name:  # CPU configs turn TRL's bf16 default off themselves
        assert parse(module.CONFIG, ["--config", str(path), "--use_cpu", "true"])[-1].bf16 is False


def test_there_are_configs_for_the_embedded_default_and_for_gpt2_on_hh_rlhf():
    names = {p.name for p in CONFIGS}
    assert {"sft_tiny.yaml", "dpo_tiny.yaml", "sft_gpt2_hh.yaml", "dpo_gpt2_hh.yaml"} <= names
