"""Protects recipes/best_of_n.py (the cross-entropy method): each round samples N answers for its own
seeded prompts, keeps exactly the top-k by reward, saves every sample with its reward, fine-tunes on the
kept answers, and the run reports per round and at the end (reward, KL to the start)."""

from __future__ import annotations

import json
from collections import defaultdict

import pytest
from conftest import load_recipe, tiny_run_args

from align_kit.configs import ModelArgs
from align_kit.models.loading import EMBEDDED_NAME, load_model


@pytest.fixture(scope="module")
def reward_folder(tiny_reward_dir):
    return str(tiny_reward_dir)


@pytest.fixture(scope="module")
def bon_run(reward_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "best_of_n"
    argv = tiny_run_args(
        out, model_name_or_path=EMBEDDED_NAME, rounds=2, samples_per_prompt=3, keep_top_k=1, prompts_per_round=6,
        max_new_tokens=10, report_prompts=4, learning_rate=1e-3, max_steps=2, per_device_train_batch_size=3,
    )  # fmt: skip
    metrics = load_recipe("best_of_n").main(argv + ["--reward_models", reward_folder])
    return out, metrics


def read_rounds(out) -> dict[int, list[dict]]:
    return {r: [json.loads(line) for line in open(out / f"round_{r}" / "samples.jsonl")] for r in (1, 2)}


def test_each_round_keeps_exactly_the_top_k_of_its_samples(bon_run):
    out, _ = bon_run
    rounds = read_rounds(out)
    for rows in rounds.values():
        assert len(rows) == 6 * 3
        groups = defaultdict(list)
        for row in rows:
            groups[row["prompt"]].append(row)
        assert len(groups) == 6
        for group in groups.values():
            kept = [row for row in group if row["kept"]]
            assert len(kept) == 1 and kept[0]["reward"] == max(row["reward"] for row in group)
    assert {r["prompt"] for r in rounds[1]} != {
        r["prompt"] for r in rounds[2]
    }  # a new seeded batch per round


def test_rounds_report_rewards_and_the_run_saves_a_trained_model(bon_run):
    out, metrics = bon_run
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    for index, report in enumerate(metrics["rounds"], start=1):
        assert report["reward_kept"] >= report["reward_samples"]  # the best of each group beats the average
        assert json.loads((out / f"round_{index}" / "report.json").read_text())["round"] == index
    assert [e["loss"] for e in metrics["log_history"] if "loss" in e]  # the last round's SFT logged a loss
    assert (out / "run_complete.json").exists() and (out / "samples.json").exists()
    trained, start = (
        load_model(ModelArgs(model_name_or_path=str(out))),
        load_model(ModelArgs(model_name_or_path=EMBEDDED_NAME)),
    )
    change = max(
        (a - b).abs().max().item() for a, b in zip(trained.parameters(), start.parameters(), strict=True)
    )
    assert change > 1e-4
    report = metrics["report"]
    assert report["n_prompts"] == 4 and isinstance(report["kl_to_reference"], float)
