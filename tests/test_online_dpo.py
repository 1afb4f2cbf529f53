"""Protects recipes/online_dpo.py: two online DPO steps with each labeller (a reward-model folder with the
oracle, an ensemble with a module:function, a pairwise judge in both orders) log a DPO loss, move the
policy away from its explicit reference, write the model and the report; the judge's labels are counted
and cached; a judge and no report scorer off the embedded task is one clear line."""

from __future__ import annotations

import json
import math

import pytest
from conftest import ScriptedJudge, load_recipe, max_change, recipe_argv

from align_kit.configs import ModelArgs
from align_kit.judges.cache import JudgmentCache
from align_kit.judges.labelling import PairwiseLabeller
from align_kit.models.loading import load_model


@pytest.fixture(scope="module")
def online_dpo():
    return load_recipe("online_dpo")


def online_args(out, model, *extra, **overrides) -> list[str]:
    values = {
        "model_name_or_path": str(model),
        "dataset": "embedded",
        "embedded_train_size": "48",
        "embedded_test_size": "24",
        "output_dir": str(out),
        "max_steps": "2",
        "per_device_train_batch_size": "4",
        "max_new_tokens": "6",
        "learning_rate": "1e-3",
        "beta": "0.1",
        "report_prompts": "4",
        "report_max_new_tokens": "6",
        "logging_steps": "1",
        "save_strategy": "no",
        "seed": "0",
        **overrides,
    }
    return recipe_argv(values, *extra)


@pytest.mark.parametrize(
    "labeller",  # the ensemble and module:function specs are GRPO's code (test_grpo): opt-in here, for time
    ["folder_and_oracle", pytest.param("ensemble_and_function", marks=pytest.mark.quality), "judge"],
)
def test_two_online_dpo_steps_with_each_labeller(
    online_dpo, reward_folders, micro_model_dir, tmp_path, labeller
):
    out = tmp_path / labeller
    extra = {
        "folder_and_oracle": ["--reward_funcs", reward_folders[0], "oracle"],
        "ensemble_and_function": [
            "--reward_funcs",
            "ensemble:" + ",".join(reward_folders),
            "test_rloo:distinct_characters",
        ],
        "judge": ["--judge", f"reward_model={reward_folders[0]}"],
    }[labeller]
    metrics = online_dpo.main(online_args(out, micro_model_dir, *extra))
    steps = [e for e in metrics["log_history"] if "loss" in e]
    assert len(steps) == 2 and all(math.isfinite(e["loss"]) and "objective/kl" in e for e in steps)
    for item in ("run_complete.json", "model.safetensors", "samples.json", "metrics.json"):
        assert (out / item).exists(), item
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    assert max_change(trained, load_model(ModelArgs(model_name_or_path=str(micro_model_dir)))) > 1e-4
    assert math.isfinite(metrics["report"]["kl_to_reference"]) and metrics["report"]["n_prompts"] == 4
    if labeller == "judge":  # 2 steps x 4 prompts, each pair judged in both orders and cached
        assert sum(metrics["labeller"]["outcomes"].values()) == 8
        cached = (out / "judge_cache.jsonl").read_text().splitlines()
        assert 1 <= len(cached) <= 16 and all(json.loads(line)["judge"] == "reward_model" for line in cached)
        assert metrics["labeller"]["traffic"]["calls"] == len(cached)


def test_a_judge_off_the_embedded_task_needs_a_report_scorer(online_dpo, micro_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"reward_funcs: name one to score the final report"):
        online_dpo.main(
            online_args(tmp_path / "x", micro_model_dir, "--judge", "oracle", dataset=str(tmp_path))
        )


def test_the_judge_labeller_pairs_answer_i_with_answer_i_plus_b(tmp_path):
    """TRL passes 2B answers, the first B then the second B answers to the same B prompts."""
    judge = ScriptedJudge(
        lambda item: "A" if "good" in item.answer_a else "B" if "good" in item.answer_b else "tie"
    )
    labeller = PairwiseLabeller(judge, JudgmentCache(tmp_path / "cache.jsonl"))
    prompts = ["p1", "p2", "p3"] * 2
    answers = ["good 1", "bad 2", "meh 3", "bad 1", "good 2", "meh 3b"]
    assert labeller(prompts=prompts, completions=answers) == [1.0, 0.0, 0.5, 0.0, 1.0, 0.5]
    stats = labeller.stats()
    assert stats["outcomes"] == {"win": 1, "loss": 1, "tie": 1} and stats["flip_rate"] == 0.0
    assert labeller.__name__ == "judge_scripted" and stats["traffic"]["calls"] == 6  # both orders
