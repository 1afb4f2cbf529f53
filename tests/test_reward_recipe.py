"""Protects recipes/reward.py: a few RewardTrainer steps on CPU log a Bradley-Terry loss, move the weights
(backbone and the new score head), write a run folder that loads back as the same reward model, and report
held-out preference accuracy and reward statistics; with an adapter only the adapter and the head train,
and the saved adapter plus head give back the trained model's rewards."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import load_recipe, tiny_run_args
from transformers import set_seed

from align_kit.configs import DataArgs
from align_kit.data import task
from align_kit.data.loading import load_preferences
from align_kit.models import adapters, rewards
from align_kit.models import loading as models
from align_kit.models.loading import EMBEDDED_NAME, load_tokenizer

RUN_FILES = ["run_config.json", "data_counts.json", "metrics.json", "run_complete.json", "tokenizer.json"]


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "reward"
    metrics = load_recipe("reward").main(
        tiny_run_args(out, model_name_or_path=EMBEDDED_NAME, learning_rate=1e-3)
    )
    return out, metrics


def held_out_rows() -> list[dict]:
    splits, _ = load_preferences(DataArgs(dataset="embedded", embedded_train_size=48, embedded_test_size=24))
    return splits["test"]


def assert_same_held_out(again: dict, reported: dict) -> None:
    """Recomputed held-out statistics equal the reported ones: the same wins per kind, rewards to 1e-5."""
    assert again["by_kind"] == reported["by_kind"]
    rest = {k: v for k, v in reported.items() if k != "by_kind"}
    assert {k: v for k, v in again.items() if k != "by_kind"} == pytest.approx(rest, abs=1e-5)


def test_reward_run_logs_a_loss_writes_the_run_and_reports_held_out_statistics(reward_run):
    out, metrics = reward_run
    assert all((out / name).exists() for name in RUN_FILES) and (out / "model.safetensors").exists()
    steps = [e for e in metrics["log_history"] if "loss" in e]
    assert len(steps) == 3 and all(math.isfinite(e["loss"]) for e in steps)
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=0.15)  # a new head starts near r_w = r_l
    assert {"accuracy", "margin"} <= set(steps[0])
    held = metrics["held_out"]
    assert held["n_pairs"] == 24 and 0.0 <= held["accuracy"] <= 1.0
    assert held["margin_mean"] == pytest.approx(held["chosen_mean"] - held["rejected_mean"], abs=1e-5)
    scale = json.loads((out / rewards.SCALE_FILE).read_text())
    assert (
        scale == {"mean": pytest.approx(held["mean"]), "std": pytest.approx(held["std"])} and scale["std"] > 0
    )


def test_saved_reward_model_reloads_with_the_reported_rewards_and_moved_weights(reward_run):
    out, metrics = reward_run
    tokenizer = load_tokenizer(str(out))
    loaded = models.load_reward_model(str(out))
    assert loaded.config.num_labels == 1 and loaded.config.pad_token_id == tokenizer.pad_token_id
    again = rewards.preference_stats(
        rewards.reward_scorer(loaded, tokenizer), held_out_rows(), task.rejected_kind
    )
    assert_same_held_out(again, metrics["held_out"])
    by_kind = again["by_kind"]
    assert "add: wrong sum" in by_kind
    assert sum(g["n_pairs"] for g in by_kind.values()) == 24
    assert sum(g["accuracy"] * g["n_pairs"] for g in by_kind.values()) / 24 == pytest.approx(
        again["accuracy"]
    )
    start = models.load_reward_model(EMBEDDED_NAME)
    moved = (loaded.transformer.h[0].mlp.c_fc.weight - start.transformer.h[0].mlp.c_fc.weight).abs().max()
    assert moved > 1e-4
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        load_recipe("reward").main(tiny_run_args(out, model_name_or_path=EMBEDDED_NAME))


def test_reward_with_an_adapter_trains_only_adapter_and_head_and_reloads_exactly(reward_run, tmp_path):
    base_dir, _ = reward_run
    out = tmp_path / "reward_adapter"
    metrics = load_recipe("reward").main(
        tiny_run_args(
            out, model_name_or_path=EMBEDDED_NAME, adapter="residual", adapter_rank=4, learning_rate=5e-3
        )
    )
    assert (out / adapters.WEIGHTS_NAME).exists() and (out / models.SCORE_HEAD_FILE).exists()
    assert not (out / "model.safetensors").exists()  # only the adapter and the head are written
    loaded = models.load_reward_model(str(out))
    set_seed(0)  # the recipe's seed: the same new head as at the start of the run
    start = dict(models.load_reward_model(EMBEDDED_NAME).named_parameters())
    trained = {
        n.replace(".base_layer", ""): p
        for n, p in loaded.named_parameters()
        if not adapters.is_adapter_parameter(n)
    }
    assert trained.keys() == start.keys()
    changed = [name for name, value in start.items() if not torch.equal(trained[name], value)]
    assert changed == ["score.weight"]  # the backbone stayed frozen; the new head trained
    ups = [p for n, p in loaded.named_parameters() if n.endswith("adapter_up.weight")]
    assert ups and all(p.abs().max() > 0 for p in ups)  # the zero-initialised up-projections moved
    tokenizer = load_tokenizer(str(out))
    again = rewards.preference_stats(
        rewards.reward_scorer(loaded, tokenizer), held_out_rows(), task.rejected_kind
    )
    assert_same_held_out(again, metrics["held_out"])
