"""Protects the promise that FSDP and DeepSpeed either shard or are refused in one line before anything loads.

On two CPU processes (gloo) FSDP2 and DeepSpeed ZeRO-2/3 really shard: accelerate would train FSDP there as
DDP, align-kit switches the trainer to FSDP2; ZeRO needs the run config's use_cpu and the deepspeed extra
(its tests skip without it). Each rank holds half of what the method shards, and the saved weights equal a
one-process run's. FSDP1 on CPU, FSDP or ZeRO on a GPU-less machine without use_cpu, and DeepSpeed without
the package stop at ``runs.start`` naming the setting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from align_kit.configs import ConfigError
from align_kit.training import launch

CONFIG_DIR = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


@pytest.mark.parametrize(
    "env, use_cpu, message",
    [
        ({"ACCELERATE_USE_FSDP": "true"}, True, r"FSDP1 \(fsdp_version: 1\) was requested on CPU: .*non-CPU"),
        ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, True, "FSDP1 .* use fsdp_version: 2"),
        (
            {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"},
            False,
            "^FSDP was .* without a GPU .*use_cpu: true$",
        ),
        ({"ACCELERATE_USE_DEEPSPEED": "true"}, False, "^DeepSpeed ZeRO was .* without a GPU .*world size 1"),
    ],
)
def test_a_launch_that_cannot_shard_is_refused_in_one_line(monkeypatch, env, use_cpu, message):
    monkeypatch.delenv("FSDP_VERSION", raising=False)
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: False)
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
    monkeypatch.setattr(launch.torch.cuda, "is_available", lambda: True)  # a GPU host
    with pytest.raises(ConfigError, match="deepspeed is not installed"):
        launch.refuse_unsharded_launch(False)


def test_a_plain_launch_fsdp2_on_cpu_and_zero_on_cpu_pass(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    launch.refuse_unsharded_launch(True)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    launch.refuse_unsharded_launch(True)
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setattr(launch.importlib.util, "find_spec", lambda name: object())  # deepspeed installed
    launch.refuse_unsharded_launch(True)


def test_a_trainer_that_wrapped_its_model_for_ddp_when_built_is_refused(monkeypatch):
    """TRL's PPOTrainer prepares its model in its constructor: too late to switch it to FSDP2."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from torch.nn.parallel import DistributedDataParallel

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    wrapped = DistributedDataParallel.__new__(DistributedDataParallel)  # the type is what is checked
    trainer = SimpleNamespace(
        accelerator=SimpleNamespace(distributed_type=DistributedType.MULTI_CPU), model=wrapped
    )
    with pytest.raises(ConfigError, match="wrapped its model for DDP .*cpu_2proc.yaml") as error:
        launch.shard_on_cpu(trainer)
    assert "\n" not in str(error.value)


def test_a_recipe_launched_for_fsdp_on_cpu_stops_before_loading(monkeypatch, tmp_path):
    from conftest import load_recipe, tiny_run_args

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(ConfigError, match="FSDP1"):
        load_recipe("dpo").main(tiny_run_args(tmp_path / "run"))
    assert not (tmp_path / "run").exists()  # refused before the run folder was made


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_sharded_accelerate_configs_ask_for_the_cpu_only_where_they_can_run_there(path):
    config = yaml.safe_load(path.read_text())
    if config.get("distributed_type") == "DEEPSPEED":
        assert config.get("use_cpu") is False, f"{path.name}: ZeRO is refused on CPU"
    if config.get("distributed_type") == "FSDP" and config.get("use_cpu"):
        assert config["fsdp_config"]["fsdp_version"] == 2, f"{path.name}: FSDP1 cannot run on CPU"


SETTINGS = {"learning_rate": "1e-3", "max_steps": "3"}  # a few SFT steps at one global batch of 8 rows


@pytest.fixture(scope="module")
def one_process_weights(tmp_path_factory, align_kit_home):
    """The weights one process saves after the same steps (8 rows a step), and the weights it started from."""
    from conftest import load_recipe, tiny_run_args
    from safetensors.torch import load_file

    from align_kit.models.loading import embedded_dir

    out = tmp_path_factory.mktemp("one") / "sft"
    load_recipe("sft").main(tiny_run_args(out, per_device_train_batch_size=8, **SETTINGS))
    return load_file(out / "model.safetensors"), load_file(
        align_kit_home / embedded_dir().name / "model.safetensors"
    )


def two_processes(tmp_path: Path, home: Path, config: str, *flags: str) -> tuple[dict, list[dict], str]:
    """Two processes x 4 rows under ``config``: (saved weights, what each rank held, log)."""
    from conftest import tiny_run_args
    from safetensors.torch import load_file
    from test_multiprocess import launch_two_processes

    args = tiny_run_args(tmp_path / "two", per_device_train_batch_size=4, **SETTINGS)
    log, counts = launch_two_processes("sft", args, tmp_path, home, CONFIG_DIR / config, *flags)
    held = [json.loads((counts / f"held{rank}").read_text()) for rank in (0, 1)]
    return load_file(tmp_path / "two" / "model.safetensors"), held, log


def assert_same_weights(two: dict, one_process_weights) -> None:
    one, start = one_process_weights
    # A gathered full state dict may also name the tied LM head, a copy of the token embedding.
    assert set(two) - set(one) <= {"lm_head.weight"}
    if "lm_head.weight" in two:
        assert torch.equal(two["lm_head.weight"], two["transformer.wte.weight"])
    moved = max((one[name] - start[name]).abs().max().item() for name in one)
    assert moved > 1e-3  # it trained, so equal weights test the sharded steps
    for name in one:
        # Only the order of float sums differs (gradients reduced in shards, batch split in two); AdamW
        # divides by the gradient's own scale, so where a gradient is near zero that rounding moves a
        # weight by up to ~4e-6 here, 0.4% of one step (lr 1e-3).
        torch.testing.assert_close(two[name], one[name], rtol=1e-5, atol=1e-5)


def assert_halves(held: list[dict], key: str, whole: int) -> None:
    assert held[0][key] + held[1][key] == whole  # shards, no copies
    for rank in held:
        assert rank[key] / whole == pytest.approx(0.5, abs=0.02)


@pytest.mark.slow
def test_fsdp2_on_two_cpu_processes_shards_and_saves_the_weights_of_one_process(
    tmp_path, align_kit_home, one_process_weights
):
    two, held, log = two_processes(tmp_path, align_kit_home, "fsdp_cpu.yaml")
    assert "FSDP2 on 2 CPU processes" in log
    total = held[0]["total"]
    assert held[1]["total"] == total > 800_000  # the embedded tiny-gpt2
    assert_halves(held, "held", total)
    assert_halves(held, "optimizer", 2 * total)  # AdamW's two moments, of this rank's shards only
    assert_same_weights(two, one_process_weights)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_on_two_cpu_processes_shards_and_saves_the_weights_of_one_process(
    tmp_path, align_kit_home, one_process_weights, stage
):
    """Needs the deepspeed extra: its CPU accelerator talks gloo; the run config's use_cpu: true does it."""
    pytest.importorskip("deepspeed")
    config = f"deepspeed_zero{stage}.yaml"
    two, held, _ = two_processes(
        tmp_path, align_kit_home, config, "--num_processes", "2", "--main_process_port", "0"
    )
    total = held[0]["total"]
    assert held[1]["total"] == total > 800_000
    if stage == 3:
        assert_halves(held, "held", total)  # parameters sharded
    else:
        assert held[0]["held"] == held[1]["held"] == total  # parameters replicated
    assert_halves(held, "optimizer", 2 * total)  # optimizer state sharded at both stages
    assert_same_weights(two, one_process_weights)
