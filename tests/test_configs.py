"""Protects configs from drifting away from code: every YAML under recipes/configs parses with the
parser of the recipe its header names, and headers state the exact command."""

from __future__ import annotations

import re

import pytest
from conftest import ROOT, load_recipe

from align_kit.parsing import NO_BF16, bf16_available, parse

CONFIGS = sorted((ROOT / "recipes" / "configs").glob("*.yaml"))
HEADER = re.compile(
    r"^# (?:accelerate launch (?:--config_file \S+ )?|python )recipes/(\w+)\.py --config (\S+)"
)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_recipe_yaml_parses_with_its_recipe(path):
    match = HEADER.match(path.read_text().splitlines()[0])
    assert match, (
        f"{path.name}: first line must be the exact 'accelerate launch recipes/X.py --config' command (python for a recipe without a trainer)"
    )
    recipe, named = match.groups()
    assert named == f"recipes/configs/{path.name}"
    module = load_recipe(recipe)
    # As given: GPU configs say bf16: auto (float32 where no GPU has bf16), CPU configs bf16: false.
    parsed = parse(module.CONFIG, ["--config", str(path)])
    assert len(parsed) == len(module.CONFIG)
    if not hasattr(parsed[-1], "gradient_checkpointing"):  # no trainer (recipes/label.py): one process
        assert path.read_text().startswith("# python ") and parsed[-1].output_dir
        return
    assert parsed[-1].output_dir and parsed[-1].gradient_checkpointing is False  # TRL's default is on
    assert parsed[-1].bf16 is bf16_available()
    if "gpt2" in path.name:
        assert re.search(r"^bf16: auto\b", path.read_text(), re.M), path.name


@pytest.mark.parametrize("given", [["--bf16", "auto"], ["--bf16=auto"], ["--bf16", "AUTO"]], ids=str)
def test_bf16_auto_is_bf16_exactly_where_a_gpu_has_it(given, monkeypatch):
    from align_kit import parsing

    module = load_recipe("sft")
    for gpu_has_bf16 in (True, False):
        monkeypatch.setattr(parsing, "bf16_available", lambda answer=gpu_has_bf16: answer)
        argv = ["--output_dir", "out", "--use_cpu", "true", *given]  # on a CPU run: never bf16
        assert parse(module.CONFIG, argv)[-1].bf16 is False
        if not gpu_has_bf16:  # transformers itself checks for the GPU when bf16 is on
            assert parse(module.CONFIG, ["--output_dir", "out", *given])[-1].bf16 is False


@pytest.mark.skipif(bf16_available(), reason="this machine has a GPU with bf16")
def test_bf16_true_without_a_bf16_gpu_names_the_fix_at_parse_time(tmp_path):
    from align_kit.configs import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse(load_recipe("sft").CONFIG, ["--config", "sft_gpt2_hh", "--bf16", "true"])
    assert str(caught.value) == f"command line: {NO_BF16}" and "set bf16: auto" in NO_BF16
    config = tmp_path / "gpu.yaml"
    config.write_text("output_dir: out\nbf16: true\n")
    with pytest.raises(ConfigError, match=rf"^{config}:2: bf16: true \(TRL's default when unset\)"):
        parse(load_recipe("sft").CONFIG, ["--config", str(config)])


def test_there_are_configs_for_the_embedded_default_and_for_gpt2_on_hh_rlhf():
    names = {p.name for p in CONFIGS}
    assert {"sft_tiny.yaml", "dpo_tiny.yaml", "sft_gpt2_hh.yaml", "dpo_gpt2_hh.yaml"} <= names
