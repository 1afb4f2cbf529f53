"""Protects recipes/grpo.py and its library parts: reward-function specs (the oracle's exact values, a
reward-model folder scoring as ``reward_scorer`` does, an ensemble's combined score and alarm count, a
user's module:function, one clear line for every bad spec); GRPOTrainerWithReference using the reference
it is given (TRL would reload one from ``_name_or_path``) with the KL coefficient; a reward on one token
raising that token's probability; and two recipe steps that log a loss, move the weights, and write the
model, samples and a report with the KL to the reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import group_sampling_args, load_recipe, max_change
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel
from trl import GRPOConfig

from align_kit.configs import ModelArgs, RewardModelArgs
from align_kit.data.task import generate as generate_task
from align_kit.models import adapters, rewards
from align_kit.models import loading as models
from align_kit.models.loading import EMBEDDED_NAME, build_byte_tokenizer, load_model
from align_kit.training import reward_funcs
from align_kit.training.grpo import GRPOTrainerWithReference

PAD = 257
REWARDED_TOKEN = ord("A")  # the byte tokenizer's id for "A"


def starts_with_rewarded_token(completion_ids, **kwargs) -> list[float]:
    """A GRPO reward function (imported by its module:function spec below): 1 when the answer starts with
    REWARDED_TOKEN."""
    return [float(bool(ids) and ids[0] == REWARDED_TOKEN) for ids in completion_ids]


def no_kwargs(prompts, completions):
    return [0.0] * len(prompts)


@pytest.fixture(scope="module")
def tokenizer():
    return build_byte_tokenizer()


def build(specs, tokenizer, **reward_settings):
    return reward_funcs.build_reward_funcs(specs, RewardModelArgs(**reward_settings), tokenizer)


def test_oracle_reward_is_the_task_checker(tokenizer):
    example = generate_task(3, "test")
    prompts = [e.prompt for e in example for _ in (0, 1)]
    answers = [a for e in example for a in (" " + e.chosen, " " + e.rejected)]
    (oracle,), ensemble = build(["oracle"], tokenizer)
    assert oracle.__name__ == "oracle" and ensemble is None
    assert oracle(prompts=prompts, completions=answers, completion_ids=None) == [1.0, 0.0] * 3


def test_reward_model_folder_scores_like_reward_scorer(reward_folders, tokenizer):
    (func,), _ = build([reward_folders[0]], tokenizer)
    example = generate_task(4, "test")
    prompts, answers = [e.prompt for e in example], [" " + e.chosen for e in example]
    model = models.load_reward_model(reward_folders[0], pad_token_id=PAD).eval()
    expected = rewards.reward_scorer(model, tokenizer).score(prompts, answers)
    got = func(prompts=prompts, completions=answers)
    assert got == pytest.approx(expected, abs=1e-6) and len(set(got)) == 4  # real, distinct scores
    assert func.__name__ == reward_folders[0].rsplit("/", 1)[-1]


def test_ensemble_spec_combines_its_members_and_counts_alarms(reward_folders, tokenizer):
    spec = "ensemble:" + ",".join(reward_folders)
    (func,), ensemble = build([spec], tokenizer, ensemble_aggregation="min", disagreement_threshold=0.0)
    example = generate_task(4, "test")
    prompts, answers = [e.prompt for e in example], [" " + e.chosen for e in example]
    members = [rewards.reward_scorer(models.load_reward_model(f, pad_token_id=PAD).eval(), tokenizer)
               for f in reward_folders]  # fmt: skip
    z = [[r / 0.1 for r in m.score(prompts, answers)] for m in members]  # standardised: mean 0, std 0.1
    assert func(prompts=prompts, completions=answers) == pytest.approx(
        [min(a, b) for a, b in zip(*z, strict=True)], abs=1e-4
    )
    assert ensemble is func.model and ensemble.stats()["n_scored"] == 4
    assert ensemble.stats()["alarms"] == 4  # threshold 0: every disagreeing answer raises the alarm


def test_module_function_spec_imports_the_function(tokenizer):
    (func,), _ = build(["test_grpo:starts_with_rewarded_token"], tokenizer)
    assert func is starts_with_rewarded_token


@pytest.mark.parametrize(
    "specs, message",
    [
        (
            ["no_such_module_xyz:f"],
            r"reward_funcs\[0\] = 'no_such_module_xyz:f': cannot import 'no_such_module_xyz'",
        ),
        (
            ["oracle", "test_grpo:nothing"],
            r"reward_funcs\[1\] = .*: module 'test_grpo' has no function 'nothing'",
        ),
        (["test_grpo:no_kwargs"], r"the function must accept \*\*kwargs"),
        (["runs/no/such/folder"], r"not 'oracle', an existing reward-model folder, 'ensemble:"),
        (["ensemble:/no/a,/no/b"], r"no such reward-model folder\(s\) \['/no/a', '/no/b'\]"),
        (["ensemble:/no/a"], r"an ensemble needs at least two reward-model folders"),
        ([], r"reward_funcs is empty"),
    ],
)
def test_bad_specs_fail_with_one_clear_line(specs, message, tokenizer):
    with pytest.raises(ValueError, match=message) as error:
        build(specs, tokenizer)
    assert "\n" not in str(error.value)


def peaked_tiny_gpt2() -> GPT2LMHeadModel:
    """A 2-layer GPT-2 from a config (so TRL's reload from ``_name_or_path`` would fail) whose wide
    initialisation makes its next-token distributions peaked: REWARDED_TOKEN gets a few percent."""
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=258, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.5,
        bos_token_id=256, eos_token_id=256, pad_token_id=PAD, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPT2LMHeadModel(config)


def first_token_probability(model, tokenizer, prompts) -> float:
    """Mean p(REWARDED_TOKEN | prompt) at the answer's first position."""
    with torch.no_grad():
        ids = [tokenizer(p, return_tensors="pt")["input_ids"] for p in prompts]
        return sum(model(x).logits[0, -1].softmax(-1)[REWARDED_TOKEN].item() for x in ids) / len(ids)


def test_a_reward_on_one_token_raises_its_probability_with_the_explicit_reference(tokenizer, tmp_path):
    prompts = ["\n\nHuman: My name is Ana. Greet me.\n\nAssistant:"]
    policy, reference = peaked_tiny_gpt2(), peaked_tiny_gpt2().eval().requires_grad_(False)
    before = first_token_probability(policy, tokenizer, prompts)
    assert 0.02 < before < 0.3  # sampled often enough to be rewarded, far from certain
    args = GRPOConfig(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=16, num_generations=8,
        max_completion_length=4, learning_rate=3e-3, beta=0.1, logging_steps=1, save_strategy="no",
        use_cpu=True, bf16=False, gradient_checkpointing=False, report_to="none", seed=0,
    )  # fmt: skip
    trainer = GRPOTrainerWithReference(
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
    assert after > before + 0.3, (before, after)  # measured: 0.11 -> 0.91
    kls = [entry["kl"] for entry in trainer.state.log_history if "kl" in entry]
    assert kls[0] == 0.0 and kls[-1] > 0  # the policy starts at the reference, then leaves it
    assert first_token_probability(reference, tokenizer, prompts) == pytest.approx(before)  # unchanged


def test_trained_log_probabilities_of_left_padded_prompts_are_those_of_each_prompt_alone(tokenizer, tmp_path):
    """TRL computes GRPO's log-probabilities without position_ids; GPT-2's absolute positions then shift
    with the left padding unless GRPOTrainerWithReference supplies them."""
    policy, reference = peaked_tiny_gpt2(), peaked_tiny_gpt2().eval()
    args = GRPOConfig(output_dir=str(tmp_path), beta=0.1, use_cpu=True, bf16=False, report_to="none")
    trainer = GRPOTrainerWithReference(
        model=policy, ref_model=reference, args=args, reward_funcs=[starts_with_rewarded_token],
        train_dataset=Dataset.from_dict({"prompt": ["a"] * 8}), processing_class=tokenizer,
    )  # fmt: skip
    rows = [tokenizer("\n\nHuman: Hi\n\nAssistant: Hello!")["input_ids"],
            tokenizer("\n\nHuman: How are you today?\n\nAssistant: Fine!")["input_ids"]]  # fmt: skip
    width = max(len(r) for r in rows)
    ids = torch.tensor([[PAD] * (width - len(r)) + r for r in rows])  # left padded, as TRL pads prompts
    mask = (ids != PAD).long()
    for model in (trainer.model, trainer.ref_model):
        batched = trainer._get_per_token_logps_and_entropies(model, ids, mask, logits_to_keep=6)[0]  # (2, 6)
        for i, row in enumerate(rows):
            alone = trainer._get_per_token_logps_and_entropies(
                model, torch.tensor([row]), torch.ones(1, len(row), dtype=torch.long), logits_to_keep=6
            )[0]
            assert torch.allclose(batched[i], alone[0], atol=1e-5)
    with_positions = trainer._get_per_token_logps_and_entropies(policy, ids, mask, logits_to_keep=6)[0]
    for handle in trainer.position_hooks:
        handle.remove()
    shifted = trainer._get_per_token_logps_and_entropies(policy, ids, mask, logits_to_keep=6)[0]
    assert (shifted[0] - with_positions[0]).abs().max() > 0.1  # TRL alone reads the short row shifted
    assert torch.equal(shifted[1], with_positions[1])  # the longest row has no padding: unchanged


def test_unsupported_reference_settings_are_refused(tokenizer, tmp_path):
    args = GRPOConfig(output_dir=str(tmp_path), sync_ref_model=True, beta=0.1, use_cpu=True, bf16=False)
    with pytest.raises(ValueError, match=r"\['sync_ref_model'\]: not supported with an explicit reference"):
        GRPOTrainerWithReference(model=peaked_tiny_gpt2(), ref_model=peaked_tiny_gpt2(), args=args,
                                 reward_funcs=[starts_with_rewarded_token], processing_class=tokenizer)  # fmt: skip


@pytest.fixture(scope="module")
def grpo():
    return load_recipe("grpo")


def test_grpo_recipe_two_steps_move_the_policy_and_report(grpo, reward_folders, tmp_path):
    out = tmp_path / "grpo"
    specs = [reward_folders[0], "oracle"]
    metrics = grpo.main(group_sampling_args(out, specs) + ["--reward_weights", "1.0", "0.5"])
    steps = [e for e in metrics["log_history"] if "loss" in e]
    assert len(steps) == 2 and all(math.isfinite(e["loss"]) for e in steps)
    name = reward_folders[0].rsplit("/", 1)[-1]
    assert all({f"rewards/{name}/mean", "rewards/oracle/mean", "kl", "reward_std"} <= set(e) for e in steps)
    for item in ("run_complete.json", "model.safetensors", "tokenizer.json", "samples.json", "metrics.json",
                 "run_config.json", "data_counts.json"):  # fmt: skip
        assert (out / item).exists(), item
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    assert max_change(trained, load_model(ModelArgs(model_name_or_path=EMBEDDED_NAME))) > 1e-4
    samples = json.loads((out / "samples.json").read_text())
    report = metrics["report"]
    assert len(samples) == report["n_prompts"] == 4
    model = models.load_reward_model(reward_folders[0], pad_token_id=PAD).eval()
    scorer = rewards.reward_scorer(model, build_byte_tokenizer())
    expected = scorer.score([s["prompt"] for s in samples], [s["answer"] for s in samples])  # oracle: 0 here
    assert [s["reward"] for s in samples] == pytest.approx(expected, abs=1e-5)
    assert report["reward_policy"] == pytest.approx(sum(expected) / 4, abs=1e-5)
    assert math.isfinite(report["kl_to_reference"]) and report["kl_to_reference"] != 0.0
    resolved = json.loads((out / "run_config.json").read_text())
    assert resolved["reward_funcs"] == specs and resolved["reward_weights"] == [1.0, 0.5]


def test_reward_models_key_is_refused(grpo, reward_folders, tmp_path):
    with pytest.raises(ValueError, match="reward_models: not read by this recipe"):
        grpo.main(group_sampling_args(tmp_path / "x", ["oracle"], reward_models=reward_folders[0]))


def test_grpo_recipe_with_an_adapter_and_an_ensemble_logs_the_disagreement(grpo, reward_folders, tmp_path):
    out = tmp_path / "grpo_adapter"
    spec = "ensemble:" + ",".join(reward_folders)
    metrics = grpo.main(
        group_sampling_args(out, [spec], adapter="residual", adapter_rank=4, disagreement_threshold=0.5)
    )
    assert (out / adapters.WEIGHTS_NAME).exists() and not (out / "model.safetensors").exists()
    trained = load_model(ModelArgs(model_name_or_path=str(out)))
    start = load_model(ModelArgs(model_name_or_path=EMBEDDED_NAME))
    ids = torch.tensor([[72, 105, 33, 32, 87]])
    with adapters.adapters_disabled(trained):  # the base stayed frozen: the reference is the start
        assert torch.equal(trained(ids).logits, start(ids).logits)
    assert not torch.equal(trained(ids).logits, start(ids).logits)  # the adapter learned something
    logged = [e for e in metrics["log_history"] if "loss" in e]  # every training step's log
    assert len(logged) == 2 and all(e["ensemble/disagreement_mean"] > 0 for e in logged)
    ensemble = metrics["ensemble"]
    assert ensemble["n_scored"] == 2 * 8 and logged[-1]["ensemble/alarms_total"] == ensemble["alarms"]
