"""Protects the promise that FSDP and DeepSpeed either shard or are refused in one line before anything loads:
on CPU (where accelerate would train unsharded DDP) and without the deepspeed package, a launch that asks for
them stops at ``runs.start`` naming the setting; no committed FSDP/DeepSpeed accelerate config sets use_cpu."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from align_kit.configs import ConfigError
from align_kit.training import launch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


@pytest.mark.parametrize(
    "env, use_cpu, message",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, True, "FSDP was requested .* on CPU"),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, True, "DeepSpeed ZeRO was requested"),
    ],
)
def test_a_launch_that_cannot_shard_is_refused_in_one_line(monkeypatch, env, use_cpu, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=message) as error:
        launch.refuse_unsharded_launch(use_cpu)
    assert "\n" not in str(error.value)


def test_deepspeed_missing_is_named(monkeypatch):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="deepspeed is not installed"):
        launch.refuse_unsharded_launch(False)


def test_a_plain_launch_passes(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    launch.refuse_unsharded_launch(True)


def test_a_recipe_launched_for_fsdp_on_cpu_stops_before_loading(monkeypatch, tmp_path):
    from conftest import load_recipe, tiny_run_args

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ConfigError, match="FSDP"):
        load_recipe("dpo").main(tiny_run_args(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_no_sharded_accelerate_config_asks_for_the_cpu(path):
    config = yaml.safe_load(path.read_text())
    if config.get("distributed_type") in ("FSDP", "DEEPSPEED"):
        assert config.get("use_cpu") is False, f"{path.name}: the launcher would drop the sharding on CPU"
