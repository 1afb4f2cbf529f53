"""Protects the SFT and DPO recipes: a few real steps on CPU that log a loss, move weights and write a run
folder; a finished run is never overwritten; DPO starts with the policy equal to its reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_recipe, tiny_run_args

from align_kit.configs import ModelArgs
from align_kit.models.loading import EMBEDDED_NAME, load_model
from align_kit.training import callbacks

RUN_FILES = ["run_config.json", "data_counts.json", "metrics.json", "run_complete.json", "tokenizer.json"]


def max_weight_change(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sft"
    metrics = load_recipe("sft").main(tiny_run_args(out, learning_rate=1e-3, max_steps=4, sft_target="mix"))
    return out, metrics


def test_sft_logs_a_loss_moves_weights_and_writes_the_run(sft_run):
    out, metrics = sft_run
    assert all((out / name).exists() for name in RUN_FILES)
    assert (out / "model.safetensors").exists()
    assert metrics["first_loss"] is not None and math.isfinite(metrics["first_loss"])
    assert len([e for e in metrics["log_history"] if "loss" in e]) == 4
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    assert max_weight_change(trained, load_model(ModelArgs(model_name_or_path=EMBEDDED_NAME))) > 1e-3
    counts = json.loads((out / "data_counts.json").read_text())
    assert counts["kept"] == {"train": 48, "test": 24}
    config = json.loads((out / "run_config.json").read_text())
    assert config["sft_target"] == "mix" and config["bf16"] is False


def test_a_finished_run_is_never_overwritten(sft_run):
    out, _ = sft_run
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        load_recipe("sft").main(tiny_run_args(out))


def test_dpo_starts_at_ln2_and_moves_weights(sft_run, tmp_path):
    sft_out, _ = sft_run
    out = tmp_path / "dpo"
    metrics = load_recipe("dpo").main(
        tiny_run_args(out, model_name_or_path=sft_out, learning_rate=1e-3, beta=0.1, loss_type="sigmoid")
    )
    first = next(e for e in metrics["log_history"] if "loss" in e)
    # The reference is the starting model, so the first step's loss is exactly -log sigmoid(0).
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-5)
    assert all((out / name).exists() for name in RUN_FILES)
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    start = load_model(ModelArgs(model_name_or_path=str(sft_out)))
    assert max_weight_change(trained, start) > 1e-4
    last = [e for e in metrics["log_history"] if "loss" in e][-1]
    assert last["rewards/margins"] > 0  # the policy moved towards the chosen answers


def test_unknown_config_key_fails_loudly(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("output_dir: x\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_recipe("sft").main(["--config", str(bad)])


def test_reference_is_loaded_from_disk_not_shared(sft_run):
    from align_kit.configs import AdapterArgs
    from align_kit.models.loading import policy_and_reference

    sft_out, _ = sft_run
    policy, reference = policy_and_reference(ModelArgs(model_name_or_path=str(sft_out)), AdapterArgs())
    assert max_weight_change(policy, reference) == 0.0
    assert all(not p.requires_grad for p in reference.parameters())
    with torch.no_grad():
        next(policy.parameters()).add_(1.0)
    assert max_weight_change(policy, reference) > 0.5  # separate weights, not a view


def test_dpo_with_residual_adapter_trains_only_the_adapter_against_the_adapter_off_reference(
    sft_run, tmp_path
):
    from align_kit.models.adapters import ADAPTER_PREFIX, CONFIG_NAME, has_adapters

    sft_out, _ = sft_run
    out = tmp_path / "dpo_adapter"
    metrics = load_recipe("dpo").main(
        tiny_run_args(
            out,
            model_name_or_path=sft_out,
            learning_rate=1e-2,
            loss_type="sigmoid",
            adapter="residual",
            adapter_rank=8,
        )
    )
    first = next(e for e in metrics["log_history"] if "loss" in e)
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)  # residual adapter starts as the identity
    assert (out / CONFIG_NAME).exists() and not (out / "model.safetensors").exists()
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    start = load_model(ModelArgs(model_name_or_path=str(sft_out)))
    assert has_adapters(trained)
    base = {k: v for k, v in trained.state_dict().items() if ADAPTER_PREFIX not in k}
    for name, value in start.state_dict().items():
        key = name.replace(".mlp.", ".mlp.base_layer.") if ".mlp." in name else name
        assert torch.equal(base[key], value), name  # the base did not move
    assert any(v.abs().max() > 0 for k, v in trained.state_dict().items() if "adapter_up" in k)


def test_sft_stops_early_when_the_reward_models_score_of_held_out_answers_stops_rising(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=258, n_positions=256, n_embd=32, n_layer=1, n_head=2, num_labels=1)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "reward")
    out = tmp_path / "sft"
    # learning rate 0: the greedy answers never change, so only the first evaluation is a gain and
    # patience 2 stops training at the third evaluation, long before max_steps
    metrics = load_recipe("sft").main(
        tiny_run_args(
            out,
            learning_rate=0.0,
            max_steps=20,
            eval_strategy="steps",
            eval_steps=1,
            early_stopping_patience=2,
            reward_stopping_model=tmp_path / "reward",
            reward_stopping_prompts=4,
            reward_stopping_max_new_tokens=6,
        )
    )
    history = metrics["log_history"]
    rewards = [e["eval_reward_mean"] for e in history if "eval_reward_mean" in e]
    assert [e["step"] for e in history if "eval_reward_mean" in e] == [1, 2, 3]
    assert len(set(rewards)) == 1 and math.isfinite(rewards[0])
    assert max(e["step"] for e in history if "loss" in e) == 3


def test_reward_stopping_is_refused_without_patience_or_outside_sft():
    from align_kit.configs import EarlyStoppingArgs

    with pytest.raises(ValueError, match="needs early_stopping_patience"):
        callbacks.trainer_callbacks(EarlyStoppingArgs(reward_stopping_model="some/folder"), object(), ["p"])
    with pytest.raises(ValueError, match="is an SFT option"):
        callbacks.trainer_callbacks(
            EarlyStoppingArgs(reward_stopping_model="some/folder", early_stopping_patience=1)
        )
