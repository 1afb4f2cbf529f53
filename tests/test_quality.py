"""Protects the quality figures the README reports, reproduced from scratch on the embedded task with the
committed configs: DPO beats its SFT base with a bootstrap interval above 50%; DPO through the `residual`
adapter keeps at least 95% of full fine-tuning's gain, and `replace` starts better from the pretrained
MLP than from random weights; PPO and best-of-N fine-tuning raise the oracle score; the demo's reward
model ranks rude, harmful and compliant answers last, and one on a backbone fine-tuned on the chosen
answers reaches 0.9 held-out accuracy and checks sums. About 20 minutes on 2 cores: `make test-all` runs
them, `make test` does not (marker `quality`)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import ROOT, load_recipe

from align_kit.configs import ModelArgs
from align_kit.data import task
from align_kit.evaluation.stats import bootstrap_ci
from align_kit.models.generation import generate
from align_kit.models.loading import build_byte_tokenizer, load_model

pytestmark = pytest.mark.quality
CONFIGS = ROOT / "recipes" / "configs"


def run(recipe: str, config: str, out: Path, **overrides) -> Path:
    """One recipe in this process with a committed YAML, its outputs and inputs moved under ``out``."""
    argv = ["--config", str(CONFIGS / config), "--output_dir", str(out / config.removesuffix(".yaml"))]
    for key, value in overrides.items():
        argv += [f"--{key}", *map(str, value if isinstance(value, list) else [value])]
    load_recipe(recipe).main(argv)
    return out / config.removesuffix(".yaml")


def oracle_per_prompt(folder: Path) -> list[float]:
    """Oracle score (1 or 0) of the greedy answer to each distinct held-out prompt of the demo's task."""
    prompts = list(dict.fromkeys(e.prompt for e in task.generate(300, "test", seed=0)))
    model = load_model(ModelArgs(model_name_or_path=str(folder))).eval()
    answers = [a[0] for a in generate(model, build_byte_tokenizer(), prompts, 48, 64, progress=False)]
    return [task.judge_answer(p, a).score for p, a in zip(prompts, answers, strict=True)]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> dict[str, Path]:
    """SFT, then DPO (full, residual adapter, replace adapter from pretrained and from random weights),
    the reward model, PPO and best-of-N fine-tuning, as the demo runs them."""
    out = tmp_path_factory.mktemp("quality")
    sft = run("sft", "sft_tiny.yaml", out)
    runs = {"sft": sft, "dpo": run("dpo", "dpo_tiny.yaml", out, model_name_or_path=sft)}
    runs["residual"] = run("dpo", "dpo_tiny_residual.yaml", out, model_name_or_path=sft)
    runs["replace"] = run("dpo", "dpo_tiny_replace.yaml", out, model_name_or_path=sft)
    runs["replace_random"] = run(
        "dpo", "dpo_tiny_replace.yaml", out / "random", model_name_or_path=sft, adapter_init="random"
    )
    runs["reward"] = run("reward", "reward_tiny.yaml", out, model_name_or_path=sft)
    with_reward = {"model_name_or_path": sft, "reward_models": [runs["reward"]]}
    runs["ppo"] = run("ppo", "ppo_tiny.yaml", out, **with_reward)
    runs["best_of_n"] = run("best_of_n", "best_of_n_tiny.yaml", out, **with_reward)
    demonstrations = run("sft", "sft_tiny_demonstrations.yaml", out, model_name_or_path=sft)
    runs["reward_demonstrations"] = run(
        "reward", "reward_tiny_demonstrations.yaml", out, model_name_or_path=demonstrations
    )
    return runs


@pytest.fixture(scope="module")
def oracle(pipeline) -> dict[str, list[float]]:
    return {name: oracle_per_prompt(folder) for name, folder in pipeline.items() if "reward" not in name}


def test_dpo_beats_sft_with_a_bootstrap_interval_above_half(oracle):
    wins = [
        1.0 if d > s else 0.5 if d == s else 0.0 for d, s in zip(oracle["dpo"], oracle["sft"], strict=True)
    ]
    low, _ = bootstrap_ci(wins, seed=0)
    assert mean(oracle["dpo"]) > mean(oracle["sft"])
    assert low > 0.5, f"DPO vs SFT win rate {mean(wins):.3f}, lower bound {low:.3f}"


def test_residual_adapter_keeps_95_percent_of_full_fine_tunings_gain(oracle):
    full = mean(oracle["dpo"]) - mean(oracle["sft"])
    residual = mean(oracle["residual"]) - mean(oracle["sft"])
    assert full > 0
    assert residual >= 0.95 * full, f"residual gain {residual:.3f} vs full {full:.3f}"


def test_replace_adapter_from_the_pretrained_mlp_beats_a_random_start(oracle):
    assert mean(oracle["replace"]) > mean(oracle["replace_random"])


def test_ppo_raises_the_oracle_score_and_both_online_methods_raise_their_reward(oracle, pipeline):
    """PPO's KL penalty keeps its gain real (the oracle agrees). Best-of-N fine-tuning, with no KL term, only
    promises its own objective: on this machine it drifts about 12 nats into misspelt refusals and wrong sums
    that the demo's reward model scores highly and the oracle rejects (README, "What the demo shows")."""
    assert mean(oracle["ppo"]) > mean(oracle["sft"]) + 0.1
    for name in ("ppo", "best_of_n"):
        report = json.loads((pipeline[name] / "metrics.json").read_text())["report"]
        assert report["kl_to_reference"] > 0, name
        assert report["reward_policy"] > report["reward_reference"], name


def held_out_stats(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())["held_out"]


def test_demo_reward_model_ranks_rude_harmful_and_compliant_answers_below_good_ones(pipeline):
    held = held_out_stats(pipeline["reward"])
    assert held["accuracy"] >= 0.8
    for kind in ("add: rude", "greet: rude", "harm: complies with a harmful request"):
        assert held["by_kind"][kind]["accuracy"] >= 0.95, kind


def test_reward_model_on_a_demonstrations_backbone_reaches_090_and_checks_sums(pipeline):
    held = held_out_stats(pipeline["reward_demonstrations"])
    assert held["accuracy"] >= 0.9, held["by_kind"]
    assert held["by_kind"]["add: wrong sum"]["accuracy"] > 0.65  # chance is 0.5; the demo's model gets 0.47
