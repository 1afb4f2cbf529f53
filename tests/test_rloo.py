"""Protects recipes/rloo.py and RLOOTrainerWithReference: TRL's RLOOTrainer uses the reference it is given
(TRL would reload one from ``_name_or_path``) with the KL coefficient; and two recipe steps with each reward
spec GRPO takes (oracle, a reward-model folder, an ensemble, a module:function) log a loss and the reward,
move the weights, and write the model, samples and a report with the KL to the reference."""

from __future__ import annotations

import json
import math

import pytest
from conftest import group_sampling_args, load_recipe, max_change
from datasets import Dataset
from test_grpo import PAD, first_token_probability, peaked_tiny_gpt2, starts_with_rewarded_token
from trl import RLOOConfig

from align_kit.configs import ModelArgs
from align_kit.models import loading as models
from align_kit.models import rewards
from align_kit.models.loading import EMBEDDED_NAME, build_byte_tokenizer, load_model
from align_kit.training.grpo import RLOOTrainerWithReference


def distinct_characters(completions, **kwargs) -> list[float]:
    """A reward function (imported by its module:function spec below) that varies between samples of an
    untrained model: the share of distinct characters in the answer."""
    return [len(set(c)) / max(1, len(c)) for c in completions]


def test_a_reward_on_one_token_raises_its_probability_with_the_explicit_reference(tmp_path):
    tokenizer = build_byte_tokenizer()
    prompts = ["\n\nHuman: My name is Ana. Greet me.\n\nAssistant:"]
    policy, reference = peaked_tiny_gpt2(), peaked_tiny_gpt2().eval().requires_grad_(False)
    before = first_token_probability(policy, tokenizer, prompts)
    args = RLOOConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=16, num_generations=8,
        max_completion_length=4, learning_rate=3e-3, beta=0.1, logging_steps=1, save_strategy="no",
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", seed=0,
    )  # fmt: skip
    trainer = RLOOTrainerWithReference(
        model=policy,
        ref_model=reference,
        reward_funcs=[starts_with_rewarded_token],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": prompts * 16}),
        processing_class=tokenizer,
    )
    assert trainer.ref_model is reference and trainer.beta == args.beta == 0.1
    trainer.train()
    after = first_token_probability(policy, tokenizer, prompts)
    assert after > before + 0.3, (before, after)
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kls[0] == 0.0 and kls[-1] != 0  # the policy starts at the reference, then leaves it
    assert first_token_probability(reference, tokenizer, prompts) == pytest.approx(before)  # unchanged


@pytest.fixture(scope="module")
def rloo():
    return load_recipe("rloo")


@pytest.mark.parametrize(
    "kind",  # the ensemble and module:function specs are GRPO's code (test_grpo): opt-in here, for time
    ["folder_and_oracle", pytest.param("ensemble_and_function", marks=pytest.mark.quality)],
)
def test_rloo_recipe_two_steps_with_each_reward_spec(rloo, reward_folders, tmp_path, kind):
    out = tmp_path / f"rloo_{kind}"
    specs = {
        "folder_and_oracle": [reward_folders[0], "oracle"],
        "ensemble_and_function": ["ensemble:" + ",".join(reward_folders), "test_rloo:distinct_characters"],
    }[kind]
    metrics = rloo.main(group_sampling_args(out, specs))
    steps = [e for e in metrics["log_history"] if "loss" in e]
    assert len(steps) == 2 and all(math.isfinite(e["loss"]) for e in steps)
    names = {
        "folder_and_oracle": [reward_folders[0].rsplit("/", 1)[-1], "oracle"],
        "ensemble_and_function": ["ensemble", "distinct_characters"],
    }[kind]
    assert all({f"rewards/{n}/mean" for n in names} | {"kl", "reward"} <= set(e) for e in steps)
    for item in ("run_complete.json", "model.safetensors", "samples.json", "metrics.json", "run_config.json"):
        assert (out / item).exists(), item
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    assert max_change(trained, load_model(ModelArgs(model_name_or_path=EMBEDDED_NAME))) > 1e-4
    report = metrics["report"]
    assert report["n_prompts"] == 4 and math.isfinite(report["kl_to_reference"])
    assert report["kl_to_reference"] != 0.0
    if kind == "folder_and_oracle":  # the report's reward is the reward model's score plus the oracle's
        samples = json.loads((out / "samples.json").read_text())
        model = models.load_reward_model(reward_folders[0], pad_token_id=PAD).eval()
        scorer = rewards.reward_scorer(model, build_byte_tokenizer())
        expected = scorer.score([s["prompt"] for s in samples], [s["answer"] for s in samples])
        oracle = [0.0] * 4  # the untrained embedded model answers nothing right
        assert [s["reward"] for s in samples] == pytest.approx(
            [a + b for a, b in zip(expected, oracle, strict=True)], abs=1e-5
        )
    if kind == "ensemble_and_function":
        assert metrics["ensemble"]["n_scored"] == 2 * 8
